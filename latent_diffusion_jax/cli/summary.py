"""Prints each network's parameter count from a config, without allocating weights.

  python -m latent_diffusion_jax.cli.summary --config configs/sd15.py
  python -m latent_diffusion_jax.cli.summary --config configs/sd21_base.py:768-v
"""

from absl import app
from ml_collections import config_flags

from latent_diffusion_jax.models.build import abstract_params, count_params, latent_size

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)


def summarize(config) -> dict:
  """{network name: parameter count} for the networks the config builds."""
  return {name: count_params(tree) for name, tree in abstract_params(config).items()}


def main(argv):
  del argv
  config = _CONFIG.value
  counts = summarize(config)
  size = latent_size(config.model)
  print(f"image {config.model.image_size}px -> latent {size}x{size}x{config.model.vae.latent_channels}")
  for name, n in counts.items():
    print(f"{name:<14} {n:>15,d} params")
  print(f"{'total':<14} {sum(counts.values()):>15,d} params")


if __name__ == "__main__":
  app.run(main)
