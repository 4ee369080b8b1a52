"""Stable Diffusion 1.5: 860M UNet (8 heads, conv projections), f8 KL VAE, CLIP ViT-L/14 text.

Parameter counts:
  python -m latent_diffusion_jax.cli.summary --config configs/sd15.py
Arguments (comma separated): `tiny` shrinks every network for tests and laptops.
"""

from latent_diffusion_jax.core.config import base_config, parse_arg, tiny_models


def get_config(arg=None):
  args = parse_arg(arg, tiny=False)
  c = base_config()
  if args.tiny:
    c.model.unet.num_heads = 4
    tiny_models(c)
  return c
