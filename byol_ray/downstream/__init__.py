"""Downstream evaluation of a registered encoder: frozen features, kNN, linear eval, fine-tuning."""
