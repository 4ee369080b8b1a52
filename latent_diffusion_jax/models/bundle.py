"""Everything inference and export need of a trained latent diffusion model, in one value.

A bundle comes from our own checkpoints (`artifacts/workdir.py`), from a diffusers pipeline
directory (`interop/diffusers.py`) or from a single-file checkpoint (`interop/single_file.py`).
"""

import dataclasses
from typing import Any, Dict, Optional

import flax.linen as nn
import jax.numpy as jnp

from latent_diffusion_jax.diffusion.spec import DiffusionSpec
from latent_diffusion_jax.models.autoencoder import AutoencoderKL
from latent_diffusion_jax.models.unet import UNet2DConditionModel
from latent_diffusion_jax.core.errors import UserInputError


@dataclasses.dataclass
class ModelBundle:
  """Modules, their params and the settings that tie them together.

  Attributes:
    unet, unet_params: the denoiser.
    vae, vae_params: the first-stage autoencoder.
    text_encoder, text_encoder_params: the conditioner (CLIPTextModel or LDMTextTransformer), or
      None for unconditional / class-conditional models.
    tokenizer_path: a local tokenizer directory (CLIP layout), or None.
    scaling_factor: latents fed to the UNet are `scaling_factor * vae latent`.
    diffusion: the training noise schedule and prediction type (`DiffusionSpec`; a mapping of
      its fields is converted).
    image_size: the training resolution in pixels.
    max_length: the tokenizer/text-encoder sequence length.
    metadata: free-form provenance (config, step, version), written into exported files.
  """
  unet: UNet2DConditionModel
  unet_params: Any
  vae: AutoencoderKL
  vae_params: Any
  text_encoder: Optional[nn.Module]
  text_encoder_params: Any
  tokenizer_path: Optional[str]
  scaling_factor: float
  diffusion: DiffusionSpec
  image_size: int
  max_length: int = 77
  metadata: Dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not isinstance(self.diffusion, DiffusionSpec):
      self.diffusion = DiffusionSpec.from_dict(self.diffusion)

  @property
  def latent_size(self) -> int:
    return self.image_size // self.vae.downsample_factor

  def encode_text(self, input_ids: jnp.ndarray) -> jnp.ndarray:
    """Token ids [B, L] -> context [B, L, D] for the UNet's cross-attention."""
    if self.text_encoder is None:
      raise UserInputError("This model has no text encoder; it cannot be prompted with text.")
    out = self.text_encoder.apply({"params": self.text_encoder_params}, input_ids)
    return out.context
