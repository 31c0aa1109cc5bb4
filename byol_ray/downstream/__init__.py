"""Downstream jobs on a registered encoder: linear evaluation, fine-tuning, embeddings and serving (on top of
``byol_ray.evaluation``)."""
