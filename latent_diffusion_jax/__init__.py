"""latent_diffusion_jax: train, sample and export latent diffusion models with JAX/Flax."""

__version__ = "0.1.0"
