"""Builds the networks of a latent diffusion model from a config (see latent_diffusion_jax/config.py)."""

from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mc

from latent_diffusion_jax.models.autoencoder import AutoencoderKL
from latent_diffusion_jax.models.unet import UNet2DConditionModel

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str) -> Any:
  if name not in _DTYPES:
    raise ValueError(f"Unknown dtype {name!r}; valid: {sorted(_DTYPES)}.")
  return _DTYPES[name]


def _common(model_cfg: mc.ConfigDict) -> Dict[str, Any]:
  return dict(dtype=dtype_of(model_cfg.dtype), param_dtype=dtype_of(model_cfg.param_dtype),
              attention_impl=model_cfg.attention_impl)


def _fields(cfg: mc.ConfigDict) -> Dict[str, Any]:
  return {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.to_dict().items()}


def build_unet(model_cfg: mc.ConfigDict) -> UNet2DConditionModel:
  return UNet2DConditionModel(**_fields(model_cfg.unet), **_common(model_cfg))


def build_vae(model_cfg: mc.ConfigDict) -> AutoencoderKL:
  return AutoencoderKL(**_fields(model_cfg.vae), **_common(model_cfg))


def build_text_encoder(model_cfg: mc.ConfigDict) -> nn.Module | None:
  """The conditioner named by `model.text_encoder.kind`, or None for "none"."""
  from latent_diffusion_jax.models.text_encoders import CLIPTextModel, LDMTextTransformer
  te = model_cfg.text_encoder
  if te.kind == "clip":
    return CLIPTextModel(**_fields(te.clip), **_common(model_cfg))
  if te.kind == "ldm_transformer":
    return LDMTextTransformer(**_fields(te.ldm), dtype=dtype_of(model_cfg.dtype),
                              param_dtype=dtype_of(model_cfg.param_dtype))
  if te.kind == "none":
    return None
  raise ValueError(f"Unknown text_encoder.kind {te.kind!r}; valid: clip, ldm_transformer, none.")


def latent_size(model_cfg: mc.ConfigDict) -> int:
  f = 2 ** (len(model_cfg.vae.block_out_channels) - 1)
  if model_cfg.image_size % f:
    raise ValueError(f"image_size {model_cfg.image_size} is not divisible by the VAE factor {f}.")
  return model_cfg.image_size // f


def context_width(model_cfg: mc.ConfigDict) -> int:
  te = model_cfg.text_encoder
  return {"clip": lambda: te.clip.hidden_size, "ldm_transformer": lambda: te.ldm.width,
          "none": lambda: model_cfg.unet.cross_attention_dim}[te.kind]()


def abstract_params(model_cfg: mc.ConfigDict) -> Dict[str, Any]:
  """Boxed param shapes of each network, via `jax.eval_shape` (nothing is allocated)."""
  unet, vae, text = build_unet(model_cfg), build_vae(model_cfg), build_text_encoder(model_cfg)
  key = jax.random.key(0)
  # Param shapes do not depend on spatial size, so the smallest valid input keeps tracing cheap.
  f = 2 ** (len(model_cfg.vae.block_out_channels) - 1)
  g = 2 ** (len(model_cfg.unet.block_out_channels) - 1)
  lat = jnp.zeros((1, g, g, unet.in_channels))
  ctx = jnp.zeros((1, 1, model_cfg.unet.cross_attention_dim))
  labels = (jnp.zeros((1,), jnp.int32),) if unet.num_class_embeds else ()
  out = {
      "unet": jax.eval_shape(lambda: unet.init(key, lat, jnp.zeros((1,), jnp.int32), ctx, *labels)),
      "vae": jax.eval_shape(lambda: vae.init(key, jnp.zeros((1, f, f, vae.in_channels)))),
  }
  if text is not None:
    ids = jnp.zeros((1, model_cfg.text_encoder.max_length), jnp.int32)
    out["text_encoder"] = jax.eval_shape(lambda: text.init(key, ids))
  return {k: v["params"] for k, v in out.items()}


def count_params(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(nn.meta.unbox(tree)))
