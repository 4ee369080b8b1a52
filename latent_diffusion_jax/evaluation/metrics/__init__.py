"""Generative metrics on feature vectors: FID, Inception Score, CLIP score, precision/recall."""
