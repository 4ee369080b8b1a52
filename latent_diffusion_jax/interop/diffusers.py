"""Loading diffusers-layout model directories (safetensors) into our modules and param trees.

A pipeline directory holds `unet/`, `vae/`, `text_encoder/`, `tokenizer/` and `scheduler/`, each
with a config and weights, as `StableDiffusionPipeline.save_pretrained` writes them; an
`LDMTextToImagePipeline` directory (a VQ first stage) names two of them `vqvae/` and `bert/`.
"""

import json
import os
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

from latent_diffusion_jax.interop.convert import torch_to_flax
from latent_diffusion_jax.interop.diffusers_config import (unet_from_diffusers_config,
                                                           vae_from_diffusers_config)
from latent_diffusion_jax.interop.diffusers_vq import load_vq_model
from latent_diffusion_jax.interop.files import load_config, load_state_dict
from latent_diffusion_jax.models.autoencoder import AutoencoderKL
from latent_diffusion_jax.diffusion.spec import DiffusionSpec
from latent_diffusion_jax.models import image_conditioning
from latent_diffusion_jax.models.build import first_stage_latent_channels
from latent_diffusion_jax.models.bundle import ModelBundle
from latent_diffusion_jax.models.unet import UNet2DConditionModel
from latent_diffusion_jax.core.errors import MissingInputError, UserInputError

# Our network names -> their subdirectory in a StableDiffusionPipeline / an LDMTextToImagePipeline.
COMPONENT_DIRS = {"unet": ("unet",), "vae": ("vae", "vqvae"),
                  "text_encoder": ("text_encoder", "bert"), "tokenizer": ("tokenizer",)}


def component_dirs(directory: str, names=tuple(COMPONENT_DIRS)) -> Dict[str, str]:
  """Our network name -> the subdirectory of the pipeline `directory` holding it, for those
  among `names` that it has (both pipeline layouts)."""
  out = {}
  for name in names:
    for sub in COMPONENT_DIRS.get(name, (name,)):
      if os.path.isdir(os.path.join(directory, sub)):
        out[name] = os.path.join(directory, sub)
        break
  return out


def abstract_unet_params(unet: UNet2DConditionModel, sample_size: int = 8) -> Any:
  """Param shapes of `unet` without allocating them."""
  f = 2 ** (len(unet.block_out_channels) - 1)
  size = max(sample_size, f)
  args = (jnp.zeros((1, size, size, unet.in_channels), unet.dtype), jnp.zeros((1,), jnp.int32),
          jnp.zeros((1, 1, unet.cross_attention_dim), unet.dtype))
  labels = (jnp.zeros((1,), jnp.int32),) if unet.num_class_embeds else ()
  return jax.eval_shape(lambda: unet.init(jax.random.key(0), *args, *labels))["params"]


def abstract_vae_params(vae: AutoencoderKL) -> Any:
  """Param shapes of `vae` without allocating them."""
  size = vae.downsample_factor * 2
  x = jnp.zeros((1, size, size, vae.in_channels), vae.dtype)
  return jax.eval_shape(lambda: vae.init(jax.random.key(0), x))["params"]


def load_unet(directory: str, *, allow_pickle: bool = False,
              **overrides) -> Tuple[UNet2DConditionModel, Any, dict]:
  """Loads a diffusers `UNet2DConditionModel` directory.

  Returns:
    (module, params as numpy arrays, the diffusers config dict).
  """
  cfg = load_config(directory)
  unet = unet_from_diffusers_config(cfg, **overrides)
  params = torch_to_flax(load_state_dict(directory, allow_pickle=allow_pickle),
                         abstract_unet_params(unet), what=f"the UNet in {directory}")
  return unet, params, cfg


def load_vae(directory: str, *, allow_pickle: bool = False,
             **overrides) -> Tuple[AutoencoderKL, Any, dict]:
  """Loads a diffusers `AutoencoderKL` directory; `cfg["scaling_factor"]` is the latent scale."""
  cfg = load_config(directory)
  vae = vae_from_diffusers_config(cfg, **overrides)
  params = torch_to_flax(load_state_dict(directory, allow_pickle=allow_pickle),
                         abstract_vae_params(vae), what=f"the VAE in {directory}")
  return vae, params, cfg


def load_first_stage(directory: str, *, allow_pickle: bool = False, **overrides) -> Tuple[Any, Any, dict]:
  """Loads a diffusers `AutoencoderKL` or `VQModel` directory (by its config's `_class_name`).

  Returns:
    (AutoencoderKL or VQModel, params as numpy arrays, the diffusers config dict).
  """
  if load_config(directory).get("_class_name") == "VQModel":
    return load_vq_model(directory, allow_pickle=allow_pickle, **overrides)
  return load_vae(directory, allow_pickle=allow_pickle, **overrides)


def check_text_encoder_dir(directory: str) -> None:
  """Refuses diffusers' LDMBertModel (an LDMTextToImagePipeline's original `bert`), which this
  package does not implement; a CLIPTextModel there loads."""
  cfg = load_config(directory)
  if cfg.get("model_type") == "ldmbert" or "LDMBertModel" in cfg.get("architectures", ()):
    raise UserInputError(f"{directory} holds diffusers' LDMBertModel, which this package does not "
                         "implement; only CLIPTextModel text encoders load.")


def load_pipeline(directory: str, *, allow_pickle: bool = False, text_output_layer: str = "last",
                  **overrides) -> ModelBundle:
  """Loads a diffusers Stable Diffusion pipeline directory (unet, vae, text_encoder, tokenizer,
  scheduler), or an LDMTextToImagePipeline one (unet, vqvae, bert = a CLIPTextModel, tokenizer,
  scheduler).

  Args:
    directory: the pipeline directory.
    allow_pickle: accept `.bin`/`.ckpt` weights (they can run code when loaded).
    text_output_layer: "last" (SD 1.x) or "penultimate" for the CLIP text encoder's output.
    **overrides: module overrides such as dtype or attention_impl, applied to all three networks.
  """
  if not os.path.isdir(directory):
    raise MissingInputError(f"No pipeline directory at {directory!r}.")
  dirs = component_dirs(directory)
  for part in ("unet", "vae"):
    if part not in dirs:
      raise MissingInputError(f"{directory!r} has no {'/ or '.join(COMPONENT_DIRS[part])}/ "
                              "subdirectory; is it a diffusers pipeline?")
  unet, unet_params, unet_cfg = load_unet(dirs["unet"], allow_pickle=allow_pickle, **overrides)
  vae, vae_params, vae_cfg = load_first_stage(dirs["vae"], allow_pickle=allow_pickle, **overrides)
  text_encoder = text_params = None
  if "text_encoder" in dirs:
    from latent_diffusion_jax.interop.clip import load_clip_text_model
    check_text_encoder_dir(dirs["text_encoder"])
    text_encoder, text_params = load_clip_text_model(
        dirs["text_encoder"], output_layer=text_output_layer,
        allow_pickle=allow_pickle, **{k: v for k, v in overrides.items() if k == "dtype"})
  tokenizer = os.path.join(directory, "tokenizer")
  scheduler_cfg = _read_json(os.path.join(directory, "scheduler", "scheduler_config.json"))
  latent_channels = first_stage_latent_channels(vae)
  return ModelBundle(
      unet=unet, unet_params=unet_params, vae=vae, vae_params=vae_params,
      text_encoder=text_encoder, text_encoder_params=text_params,
      tokenizer_path=tokenizer if os.path.isdir(tokenizer) else None,
      scaling_factor=float(vae_cfg.get("scaling_factor", 0.18215)),
      diffusion=diffusion_from_scheduler_config(scheduler_cfg),
      image_size=int(unet_cfg.get("sample_size", 64)) * vae.downsample_factor,
      max_length=text_encoder.max_position_embeddings if text_encoder is not None else 77,
      metadata={"source": directory},
      image_conditioning=conditioning_from_pipeline(directory, unet.in_channels, latent_channels))


UPSCALE_PIPELINE = "StableDiffusionUpscalePipeline"


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def conditioning_from_pipeline(directory: str, unet_in_channels: int,
                               latent_channels: int) -> "image_conditioning.ImageConditioning":
  """The image conditioning of a pipeline directory: an upscaler (its model_index names
  StableDiffusionUpscalePipeline; its low_res_scheduler and max_noise_level), an inpainting
  model (UNet input 2 * latent + 1 channels, StableDiffusionInpaintPipeline), or None."""
  index = _read_json(os.path.join(directory, "model_index.json"))
  if index.get("_class_name") != UPSCALE_PIPELINE:
    return image_conditioning.infer(unet_in_channels, latent_channels)
  cond = image_conditioning.infer(unet_in_channels, latent_channels, upscaling=True)
  low_res = _read_json(os.path.join(directory, "low_res_scheduler", "scheduler_config.json"))
  noise = diffusion_from_scheduler_config(low_res) if low_res else None
  return image_conditioning.ImageConditioning(
      "upscaling", noise=noise,
      max_noise_level=int(index.get("max_noise_level", image_conditioning.UPSCALER_MAX_NOISE_LEVEL)))


def diffusion_from_scheduler_config(cfg: dict) -> DiffusionSpec:
  """The diffusion description of a diffusers scheduler_config.json (SD defaults if empty)."""
  kind = cfg.get("beta_schedule", "scaled_linear")
  return DiffusionSpec(
      schedule="cosine" if kind == "squaredcos_cap_v2" else kind,
      num_timesteps=int(cfg.get("num_train_timesteps", 1000)),
      beta_start=float(cfg.get("beta_start", 0.00085)),
      beta_end=float(cfg.get("beta_end", 0.012)),
      rescale_zero_terminal_snr=bool(cfg.get("rescale_betas_zero_snr", False)),
      prediction_type=cfg.get("prediction_type", "epsilon"))
