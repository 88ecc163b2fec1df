"""Synthetic data and the bundled models trained on it (off the serving path)."""
