"""Evaluation below the run lifecycle: evaluation splits, frozen features and kNN top-1.

Used by held-out validation during training (``byol_ray.validation``) and by the downstream jobs
(``byol_ray.downstream``) alike; it imports neither.
"""
