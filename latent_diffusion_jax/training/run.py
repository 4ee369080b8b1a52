"""Dispatches a config to its trainer and applies process-wide settings."""

import ml_collections as mc
from absl import logging

from latent_diffusion_jax import logs, parallel


def run_training(config: mc.ConfigDict, workdir: str) -> dict:
  """Trains stage 1 (`config.stage == "autoencoder"`) or stage 2 (anything else) in `workdir`."""
  logs.quiet_libraries()
  parallel.initialize_distributed()
  stage = config.get("stage", "diffusion")
  if stage == "autoencoder":
    from latent_diffusion_jax.training.autoencoder_trainer import train
  elif stage == "diffusion":
    from latent_diffusion_jax.training.diffusion_trainer import train
  else:
    raise ValueError(f"Unknown config.stage {stage!r}; valid: autoencoder, diffusion.")
  result = train(config, workdir)
  logging.info("Finished at step %d%s", result["step"], " (preempted)" if result["preempted"] else "")
  return result
