"""Training stages by name (`config.stage`). A new stage is a module here plus one entry below;
the driver (training/driver.py) needs no change."""

from typing import Type

from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.training.stages.autoencoder import AutoencoderStage
from latent_diffusion_jax.training.stages.base import Plan, Stage
from latent_diffusion_jax.training.stages.controlnet import ControlNetStage
from latent_diffusion_jax.training.stages.diffusion import DiffusionStage

STAGES = {
    "autoencoder": AutoencoderStage,  # stage 1: KL / VQ autoencoder
    "diffusion": DiffusionStage,      # stage 2: latent diffusion UNet
    "controlnet": ControlNetStage,    # a ControlNet on a frozen stage-2 model
}

__all__ = ["STAGES", "Plan", "Stage", "get"]


def get(name: str) -> Type[Stage]:
  """The stage class registered as `name`."""
  if name not in STAGES:
    raise UserInputError(f"Unknown config.stage {name!r}; valid: {', '.join(sorted(STAGES))}.")
  return STAGES[name]
