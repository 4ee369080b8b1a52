"""Everything inference and export need of a trained latent diffusion model, in one value.

A bundle comes from our own checkpoints (`artifacts/workdir.py`), from a diffusers pipeline
directory (`interop/diffusers.py`) or from a single-file checkpoint (`interop/single_file.py`).
"""

import dataclasses
from typing import Any, Dict, Optional, Union

import flax.linen as nn
import jax.numpy as jnp

from latent_diffusion_jax.diffusion.spec import DiffusionSpec
from latent_diffusion_jax.models.autoencoder import AutoencoderKL
from latent_diffusion_jax.models.conditioners.base import Conditioner
from latent_diffusion_jax.models.build import first_stage_kind, first_stage_latent_channels
from latent_diffusion_jax.models.unet import UNet2DConditionModel
from latent_diffusion_jax.models.vq import VQModel
from latent_diffusion_jax.core.errors import UserInputError

FirstStage = Union[AutoencoderKL, VQModel]


def decode_latents(vae: FirstStage, vae_params: Any, latents: jnp.ndarray) -> jnp.ndarray:
  """Unscaled latents [B, h, w, c] -> images [B, H, W, 3] in about [-1, 1].

  A VQ first stage quantizes first (nearest codebook entries, then post_quant_conv and decoder):
  stage 2 diffuses its pre-quantization latents, and the LDM paper counts the quantizer as the
  decoder's first layer (diffusers' `VQModel.decode` with force_not_quantize=False).
  """
  if isinstance(vae, VQModel):
    return vae.apply({"params": vae_params}, latents, False, method=vae.decode)
  return vae.apply({"params": vae_params}, latents, method=vae.decode)


@dataclasses.dataclass
class ModelBundle:
  """Modules, their params and the settings that tie them together.

  Attributes:
    unet, unet_params: the denoiser.
    vae, vae_params: the first-stage autoencoder: an AutoencoderKL, or a VQModel whose
      pre-quantization latents the UNet denoises (`decode_latents` quantizes them).
    text_encoder, text_encoder_params: the conditioner (CLIPTextModel or LDMTextTransformer), or
      None for unconditional / class-conditional models.
    tokenizer_path: a local tokenizer directory (CLIP layout), or None.
    scaling_factor: latents fed to the UNet are `scaling_factor * vae latent`.
    diffusion: the training noise schedule and prediction type (`DiffusionSpec`; a mapping of
      its fields is converted).
    image_size: the training resolution in pixels.
    max_length: the tokenizer/text-encoder sequence length.
    metadata: free-form provenance (config, step, version), written into exported files.
    conditioner, conditioner_params: a non-text conditioner (class labels, layouts, precomputed
      embeddings, a user's; models/conditioners/) and its params, or None (text models use
      text_encoder; unconditional models have neither).
  """
  unet: UNet2DConditionModel
  unet_params: Any
  vae: FirstStage
  vae_params: Any
  text_encoder: Optional[nn.Module]
  text_encoder_params: Any
  tokenizer_path: Optional[str]
  scaling_factor: float
  diffusion: DiffusionSpec
  image_size: int
  max_length: int = 77
  metadata: Dict[str, Any] = dataclasses.field(default_factory=dict)
  conditioner: Optional[Conditioner] = None
  conditioner_params: Any = None

  def __post_init__(self):
    if not isinstance(self.diffusion, DiffusionSpec):
      self.diffusion = DiffusionSpec.from_dict(self.diffusion)

  @property
  def latent_size(self) -> int:
    return self.image_size // self.vae.downsample_factor

  @property
  def first_stage_kind(self) -> str:
    """"vq" or "kl" (the `autoencoder.kind` of the run that trained it)."""
    return first_stage_kind(self.vae)

  @property
  def latent_channels(self) -> int:
    """Channels of the latents the UNet denoises."""
    return first_stage_latent_channels(self.vae)

  def decode(self, latents: jnp.ndarray) -> jnp.ndarray:
    """UNet-space (scaled) latents -> images in about [-1, 1], through the quantizer for VQ."""
    return decode_latents(self.vae, self.vae_params, latents / self.scaling_factor)

  def encode_text(self, input_ids: jnp.ndarray) -> jnp.ndarray:
    """Token ids [B, L] -> context [B, L, D] for the UNet's cross-attention."""
    if self.text_encoder is None:
      raise UserInputError("This model has no text encoder; it cannot be prompted with text.")
    out = self.text_encoder.apply({"params": self.text_encoder_params}, input_ids)
    return out.context
