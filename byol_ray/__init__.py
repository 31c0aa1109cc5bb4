"""BYOL at cluster scale."""
