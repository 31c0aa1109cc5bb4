"""Data layer: sources on disk, FFCV .beton preparation, and the two-view / eval loaders.

Nothing here imports FFCV, numba or scikit-learn at import time; each is imported where used.
"""
