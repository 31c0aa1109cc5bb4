"""Data layer: sources on disk, FFCV .beton preparation, sample order and crop law, and the loader backends.

Nothing here imports FFCV, numba or scikit-learn at import time (``two_view``, the FFCV backend, does: the
loader dispatcher imports it only after checking that FFCV is available).
"""
from byol_ray.data.check import check_training_data

__all__ = ["check_training_data"]
