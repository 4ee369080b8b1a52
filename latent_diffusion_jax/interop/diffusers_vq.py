"""diffusers `VQModel` directories <-> our `models.vq.VQModel` (safetensors; pickles on request).

Both module trees are encoder / quant_conv / quantize.embedding / post_quant_conv / decoder, so the
weights map with the generic rules of interop/convert.py. Only the plain (group-norm) VQModel is
supported; MoVQ's spatial-norm decoder (norm_type="spatial") is refused.

  vq, params, cfg = load_vq_model("/path/to/vqmodel")
  export_vq_model(vq, params, "/tmp/vq_export", sample_size=256, scaling_factor=1.0)

A whole VQ latent diffusion model (a ModelBundle whose vae is a VQModel) is written by
`interop.export_diffusers.export_diffusers` as an `LDMTextToImagePipeline` directory.
"""

import json
import os
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

from latent_diffusion_jax.interop.convert import flax_to_torch, torch_to_flax
from latent_diffusion_jax.interop.diffusers_config import (autoencoder_fields,
                                                           check_autoencoder_blocks,
                                                           vq_to_diffusers_config)
from latent_diffusion_jax.interop.export_diffusers import cast_state_dict, numpy_dtype, save_safetensors
from latent_diffusion_jax.interop.files import load_config, load_state_dict
from latent_diffusion_jax.models.vq import VQModel
from latent_diffusion_jax.core.errors import UserInputError

__all__ = ["vq_from_diffusers_config", "vq_to_diffusers_config", "abstract_vq_params",
           "load_vq_model", "export_vq_model"]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def vq_from_diffusers_config(cfg: Dict[str, Any], **overrides) -> VQModel:
  """Builds our VQModel from a diffusers `VQModel` config dict (overrides: dtype, attention_impl)."""
  check_autoencoder_blocks(cfg, "VQModel")
  if cfg.get("norm_type", "group") != "group":
    raise UserInputError(f"Unsupported VQModel norm_type {cfg['norm_type']!r} (MoVQ); only 'group'.")
  if cfg.get("lookup_from_codebook", False):
    raise UserInputError("VQModel lookup_from_codebook=True (decoding from indices) is not supported.")
  kwargs = autoencoder_fields(cfg, latent_channels=3)
  kwargs.update(num_vq_embeddings=cfg.get("num_vq_embeddings", 256),
                vq_embed_dim=cfg.get("vq_embed_dim") or kwargs["latent_channels"])
  kwargs.update(overrides)
  return VQModel(**kwargs)


def abstract_vq_params(vq: VQModel) -> Any:
  """Param shapes of `vq` without allocating them."""
  size = vq.downsample_factor * 2
  x = jnp.zeros((1, size, size, vq.in_channels), vq.dtype)
  return jax.eval_shape(lambda: vq.init(jax.random.key(0), x))["params"]


def load_vq_model(directory: str, *, allow_pickle: bool = False,
                  **overrides) -> Tuple[VQModel, Any, dict]:
  """Loads a diffusers `VQModel` directory.

  Returns:
    (module, params as numpy arrays, the diffusers config dict; `cfg["scaling_factor"]` is the
    latent scale).
  """
  cfg = load_config(directory)
  vq = vq_from_diffusers_config(cfg, **overrides)
  params = torch_to_flax(load_state_dict(directory, allow_pickle=allow_pickle),
                         abstract_vq_params(vq), what=f"the VQModel in {directory}")
  return vq, params, cfg


def export_vq_model(vq: VQModel, params: Any, out_dir: str, *, sample_size: int,
                    scaling_factor: float = 1.0, dtype: str = "float32") -> str:
  """Writes `vq` as a diffusers `VQModel` directory (config.json + safetensors); returns out_dir.

  `diffusers.VQModel.from_pretrained(out_dir)` and `load_vq_model(out_dir)` read it back.
  """
  numpy_dtype(dtype)
  cfg = vq_to_diffusers_config(vq, sample_size, scaling_factor)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
    f.write("\n")
  state_dict = cast_state_dict(flax_to_torch(jax.device_get(params)), dtype)
  save_safetensors(state_dict, os.path.join(out_dir, WEIGHTS_NAME),
                   {"format": "pt", "config": json.dumps(cfg, sort_keys=True)})
  return out_dir
