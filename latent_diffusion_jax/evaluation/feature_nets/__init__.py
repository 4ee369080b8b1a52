"""Feature networks of the generative metrics (FID Inception, CLIP, the shapes network)."""
