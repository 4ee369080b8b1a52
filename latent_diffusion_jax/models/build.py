"""Builds the networks of a latent diffusion model from a config (see latent_diffusion_jax/config.py)."""

import dataclasses
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mc

from latent_diffusion_jax.models.autoencoder import AutoencoderKL
from latent_diffusion_jax.models.unet import UNet2DConditionModel
from latent_diffusion_jax.models.vq import VQModel
from latent_diffusion_jax.core.errors import UserInputError

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str) -> Any:
  if name not in _DTYPES:
    raise UserInputError(f"Unknown dtype {name!r}; valid: {sorted(_DTYPES)}.")
  return _DTYPES[name]


def _common(model_cfg: mc.ConfigDict) -> Dict[str, Any]:
  return dict(dtype=dtype_of(model_cfg.dtype), param_dtype=dtype_of(model_cfg.param_dtype),
              attention_impl=model_cfg.attention_impl)


def _fields(cfg: mc.ConfigDict) -> Dict[str, Any]:
  return {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.to_dict().items()}


def build_unet(model_cfg: mc.ConfigDict) -> UNet2DConditionModel:
  """The UNet of `model.unet`; a class conditioner with use_unet_class_embedding sets its
  num_class_embeds to num_classes + 1 (the last row the null class)."""
  fields = _fields(model_cfg.unet)
  cond = model_cfg.get("conditioner")
  if cond is not None and conditioner_kind(model_cfg) == "class" and cond.use_unet_class_embedding:
    fields["num_class_embeds"] = int(cond.num_classes) + 1
  return UNet2DConditionModel(**fields, **_common(model_cfg))


def build_vae(model_cfg: mc.ConfigDict) -> AutoencoderKL:
  return AutoencoderKL(**_fields(model_cfg.vae), **_common(model_cfg))


def build_first_stage(config: mc.ConfigDict) -> nn.Module:
  """The autoencoder of `config.autoencoder.kind`: "kl" (AutoencoderKL) or "vq" (VQModel), shaped
  by `config.model.vae` (and, for VQ, the codebook keys of `config.autoencoder`).

  Stage 1 trains this network; a stage-2 config describes its frozen first stage with the same
  keys, so every consumer of a stage-2 run (loader, sampler, exporter) rebuilds the same network.
  """
  kind = config.autoencoder.kind
  if kind == "kl":
    return build_vae(config.model)
  if kind == "vq":
    v, a, m = config.model.vae, config.autoencoder, config.model
    if not v.use_quant_conv:
      raise UserInputError("autoencoder.kind='vq' needs model.vae.use_quant_conv=True (VQModel has them).")
    return VQModel(in_channels=v.in_channels, out_channels=v.out_channels,
                   block_out_channels=tuple(v.block_out_channels), layers_per_block=v.layers_per_block,
                   latent_channels=v.latent_channels, num_vq_embeddings=a.num_vq_embeddings,
                   vq_embed_dim=a.vq_embed_dim or v.latent_channels, norm_num_groups=v.norm_num_groups,
                   mid_block_attention=v.mid_block_attention, attention_impl=m.attention_impl,
                   dtype=dtype_of(m.dtype), param_dtype=dtype_of(m.param_dtype))
  raise UserInputError(f"Unknown autoencoder.kind {kind!r}; valid: kl, vq.")


def first_stage_kind(module: nn.Module) -> str:
  """"vq" for a VQModel, "kl" for an AutoencoderKL (the values of `autoencoder.kind`)."""
  return "vq" if isinstance(module, VQModel) else "kl"


def first_stage_latent_channels(module: nn.Module) -> int:
  """Channels of the latents stage 2 diffuses: a VQ model's pre-quantization latents (its codebook
  vector size), a KL model's posterior samples."""
  return module.embed_dim if isinstance(module, VQModel) else module.latent_channels


# Config key -> the VQModel field it sets (build_first_stage), for naming a mismatched key.
_VQ_KEYS = {"model.vae.in_channels": "in_channels", "model.vae.out_channels": "out_channels",
            "model.vae.block_out_channels": "block_out_channels",
            "model.vae.layers_per_block": "layers_per_block",
            "model.vae.latent_channels": "latent_channels",
            "model.vae.norm_num_groups": "norm_num_groups",
            "model.vae.mid_block_attention": "mid_block_attention",
            "autoencoder.num_vq_embeddings": "num_vq_embeddings",
            "autoencoder.vq_embed_dim": "embed_dim"}


def check_first_stage(config: mc.ConfigDict, module: nn.Module, source: str) -> None:
  """Refuses a frozen first stage that the stage-2 config does not describe.

  The run's config is all that sampling, export and resuming read later to rebuild the first
  stage, so its kind (`autoencoder.kind`) must be the loaded network's, and for a VQ model the
  layout and codebook keys must build the same network.

  Raises:
    UserInputError: naming the mismatched key, its value and the network's.
  """
  kind, found = config.autoencoder.kind, first_stage_kind(module)
  if kind != found:
    raise UserInputError(
        f"autoencoder.kind={kind!r}, but frozen.vae={source!r} is a {found.upper()} first stage "
        f"({type(module).__name__}); set --config.autoencoder.kind={found} (and, for a VQ model, "
        "its model.vae layout, autoencoder.num_vq_embeddings and autoencoder.vq_embed_dim).")
  if found != "vq":
    return
  built = build_first_stage(config)
  for key, field in _VQ_KEYS.items():
    mine, theirs = getattr(built, field), getattr(module, field)
    if (tuple(mine) if isinstance(mine, (list, tuple)) else mine) != (
        tuple(theirs) if isinstance(theirs, (list, tuple)) else theirs):
      raise UserInputError(f"{key}={mine!r} does not describe frozen.vae={source!r}, whose "
                           f"{field} is {theirs!r}; set --config.{key} to match it.")
  channels = first_stage_latent_channels(module)
  if config.model.unet.out_channels != channels:
    raise UserInputError(f"model.unet.out_channels={config.model.unet.out_channels}, but the VQ "
                         f"first stage's pre-quantization latents have {channels} channels; set "
                         f"model.unet.in_channels and out_channels to {channels}.")


def build_text_encoder(model_cfg: mc.ConfigDict) -> nn.Module | None:
  """The conditioner named by `model.text_encoder.kind`, or None for "none"."""
  from latent_diffusion_jax.models.text_encoders import CLIPTextModel, LDMTextTransformer
  te = model_cfg.text_encoder
  if conditioner_kind(model_cfg) not in ("clip", "ldm_transformer"):
    return None  # a non-text conditioner (model.conditioner.kind) or an unconditional model
  # model.text_encoder.max_length is the one source of the sequence length; configs stored by
  # earlier versions also carry it per encoder, with the same value.
  clip = {k: v for k, v in _fields(te.clip).items() if k != "max_position_embeddings"}
  ldm = {k: v for k, v in _fields(te.ldm).items() if k != "max_length"}
  if te.kind == "clip":
    return CLIPTextModel(**clip, max_position_embeddings=te.max_length, **_common(model_cfg))
  if te.kind == "ldm_transformer":
    return LDMTextTransformer(**ldm, max_length=te.max_length, dtype=dtype_of(model_cfg.dtype),
                              param_dtype=dtype_of(model_cfg.param_dtype))
  if te.kind == "none":
    return None
  raise UserInputError(f"Unknown text_encoder.kind {te.kind!r}; valid: clip, ldm_transformer, none.")


def conditioner_kind(model_cfg: mc.ConfigDict) -> str:
  """`model.conditioner.kind`, or the text encoder's kind when it is "" (configs of text models
  and runs stored before conditioners existed)."""
  cond = model_cfg.get("conditioner")
  kind = cond.kind if cond is not None else ""
  return kind or model_cfg.text_encoder.kind


def conditioner_config(model_cfg: mc.ConfigDict) -> str:
  """JSON of what `build_conditioner` reads (model.conditioner, the context width, dtypes and the
  attention kernel), from which `conditioner_from_config` rebuilds the same conditioner."""
  import json
  cond = model_cfg.get("conditioner")
  return json.dumps({
      "conditioner": cond.to_dict() if cond is not None else {"kind": ""},
      "text_encoder_kind": model_cfg.text_encoder.kind,
      "cross_attention_dim": int(model_cfg.unet.cross_attention_dim),
      "dtype": model_cfg.dtype, "param_dtype": model_cfg.param_dtype,
      "attention_impl": model_cfg.attention_impl}, sort_keys=True, default=list)


def conditioner_from_config(text: str, **overrides):
  """The conditioner `conditioner_config` describes (a non-text one); `overrides` may set dtype
  (a name) and attention_impl."""
  import json
  d = json.loads(text)
  d.update({k: v for k, v in overrides.items() if v is not None})
  cond = d["conditioner"]
  cond["class_names"] = tuple(cond.get("class_names", ()))
  model_cfg = mc.ConfigDict({
      "conditioner": cond, "text_encoder": {"kind": d["text_encoder_kind"]},
      "unet": {"cross_attention_dim": d["cross_attention_dim"]}, "dtype": d["dtype"],
      "param_dtype": d["param_dtype"], "attention_impl": d["attention_impl"]})
  return build_conditioner(model_cfg)


def build_conditioner(model_cfg: mc.ConfigDict, empty_ids=None):
  """The run's conditioner (models/conditioners/), or None for an unconditional model.

  Args:
    model_cfg: the run's config.model.
    empty_ids: the empty prompt's token ids (a text conditioner's null input), when known.
  """
  from latent_diffusion_jax.models.conditioners import registry
  from latent_diffusion_jax.models.conditioners.text import text_conditioner
  cond = model_cfg.get("conditioner")
  kind = conditioner_kind(model_cfg)
  width = model_cfg.unet.cross_attention_dim
  dtype, param_dtype = dtype_of(model_cfg.dtype), dtype_of(model_cfg.param_dtype)
  if cond is not None:
    registry.import_user_module(cond.module)
  if kind == "none":
    return None
  if kind in ("clip", "ldm_transformer") and model_cfg.text_encoder.kind != kind:
    raise UserInputError(f"model.conditioner.kind={kind!r} needs model.text_encoder.kind={kind!r} "
                         f"(it holds that encoder's settings), not {model_cfg.text_encoder.kind!r}.")
  if kind not in ("clip", "ldm_transformer"):
    return dataclasses.replace(_non_text_conditioner(model_cfg, kind, width, dtype, param_dtype),
                               config=conditioner_config(model_cfg))
  return text_conditioner(kind, build_text_encoder(model_cfg), model_cfg.text_encoder.trainable,
                          context_width(model_cfg), empty_ids)


def _non_text_conditioner(model_cfg, kind, width, dtype, param_dtype):
  from latent_diffusion_jax.models.conditioners import registry
  from latent_diffusion_jax.models.conditioners.class_embedder import class_conditioner
  from latent_diffusion_jax.models.conditioners.layout import layout_conditioner
  from latent_diffusion_jax.models.conditioners.precomputed import precomputed_conditioner
  cond = model_cfg.conditioner
  if kind == "class":
    return class_conditioner(cond.num_classes, width, context=cond.class_context,
                             unet_labels=cond.use_unet_class_embedding,
                             class_names=tuple(cond.class_names), dtype=dtype,
                             param_dtype=param_dtype)
  if kind == "layout":
    return layout_conditioner(cond.layout, cond.num_classes, tuple(cond.class_names), width,
                              model_cfg.attention_impl, dtype, param_dtype)
  if kind == "precomputed":
    return precomputed_conditioner(cond.precomputed.width, cond.precomputed.length, width)
  conditioner = registry.registered(kind)(model_cfg)
  if conditioner.context_width != width:
    raise UserInputError(f"The {kind!r} conditioner's context width {conditioner.context_width} must "
                         f"equal model.unet.cross_attention_dim={width}.")
  return conditioner


def latent_size(model_cfg: mc.ConfigDict) -> int:
  f = 2 ** (len(model_cfg.vae.block_out_channels) - 1)
  if model_cfg.image_size % f:
    raise UserInputError(f"image_size {model_cfg.image_size} is not divisible by the VAE factor {f}.")
  return model_cfg.image_size // f


def context_width(model_cfg: mc.ConfigDict) -> int:
  te = model_cfg.text_encoder
  return {"clip": lambda: te.clip.hidden_size, "ldm_transformer": lambda: te.ldm.width,
          "none": lambda: model_cfg.unet.cross_attention_dim}[te.kind]()


def abstract_module_params(module: nn.Module, max_length: int = 1) -> Any:
  """Boxed param shapes of one of our networks (UNet, autoencoder, text encoder), via
  `jax.eval_shape`: nothing is allocated. `max_length` is a text encoder's sequence length."""
  from latent_diffusion_jax.models.conditioners.base import Conditioner
  if isinstance(module, Conditioner):
    return module.abstract_params()
  key = jax.random.key(0)
  if hasattr(module, "cross_attention_dim"):  # a UNet
    # Param shapes do not depend on spatial size, so the smallest valid input keeps tracing cheap.
    g = 2 ** (len(module.block_out_channels) - 1)
    lat = jnp.zeros((1, g, g, module.in_channels))
    ctx = jnp.zeros((1, 1, module.cross_attention_dim))
    labels = (jnp.zeros((1,), jnp.int32),) if module.num_class_embeds else ()
    init = lambda: module.init(key, lat, jnp.zeros((1,), jnp.int32), ctx, *labels)
  elif hasattr(module, "downsample_factor"):  # an autoencoder
    f = module.downsample_factor
    init = lambda: module.init(key, jnp.zeros((1, f, f, module.in_channels)))
  else:  # a text encoder
    init = lambda: module.init(key, jnp.zeros((1, max_length), jnp.int32))
  return jax.eval_shape(init)["params"]


def abstract_params(config: mc.ConfigDict) -> Dict[str, Any]:
  """Boxed param shapes of each network a run's config builds (nothing is allocated); the first
  stage is the KL or VQ autoencoder `autoencoder.kind` names."""
  model_cfg = config.model
  out = {"unet": abstract_module_params(build_unet(model_cfg)),
         "vae": abstract_module_params(build_first_stage(config))}
  if conditioner_kind(model_cfg) in ("clip", "ldm_transformer"):
    text = build_text_encoder(model_cfg)
    out["text_encoder"] = abstract_module_params(text, model_cfg.text_encoder.max_length)
  else:
    conditioner = build_conditioner(model_cfg)
    if conditioner is not None and conditioner.module is not None:
      out["conditioner"] = conditioner.abstract_params()
  return out


def count_params(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(nn.meta.unbox(tree)))
