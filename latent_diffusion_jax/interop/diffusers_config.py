"""Translation between diffusers' config.json dictionaries and our model modules (both ways)."""

from typing import Any, Dict

from latent_diffusion_jax.models.autoencoder import AutoencoderKL
from latent_diffusion_jax.models.unet import UNet2DConditionModel, heads_per_level
from latent_diffusion_jax.models.vq import VQModel
from latent_diffusion_jax.core.errors import UserInputError

_CROSS_DOWN, _PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_CROSS_UP, _PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"

# diffusers UNet options we do not model, with the value that means "off".
_UNET_DEFAULTS = {
    "act_fn": "silu", "center_input_sample": False, "class_embed_type": None,
    "addition_embed_type": None, "time_cond_proj_dim": None, "encoder_hid_dim": None,
    "resnet_time_scale_shift": "default", "conv_in_kernel": 3, "conv_out_kernel": 3,
    "timestep_post_act": None, "dual_cross_attention": False,
    "attention_type": "default", "time_embedding_type": "positional", "projection_class_embeddings_input_dim": None,
    "class_embeddings_concat": False, "cross_attention_norm": None, "reverse_transformer_layers_per_block": None,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "mid_block_only_cross_attention": None, "addition_time_embed_dim": None,
}


def _check_unsupported(cfg: Dict[str, Any], defaults: Dict[str, Any], what: str) -> None:
  bad = {k: cfg[k] for k, v in defaults.items()
         if k in cfg and cfg[k] != v and not (isinstance(v, bool) and cfg[k] in (None, v))
         and not (isinstance(cfg[k], (list, tuple)) and all(x == v for x in cfg[k]))}
  if bad:
    raise UserInputError(f"{what} uses options this package does not implement: {bad}.")


def unet_from_diffusers_config(cfg: Dict[str, Any], **overrides) -> UNet2DConditionModel:
  """Builds our UNet from a diffusers `UNet2DConditionModel` config dict.

  `overrides` (e.g. dtype, attention_impl, remat) are passed to the module.
  """
  _check_unsupported(cfg, _UNET_DEFAULTS, "The diffusers UNet config")
  down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
  known_down, known_up = {_CROSS_DOWN, _PLAIN_DOWN}, {_CROSS_UP, _PLAIN_UP}
  if set(down) - known_down or set(up) - known_up:
    raise UserInputError(f"Unsupported block types {sorted((set(down) - known_down) | (set(up) - known_up))}; "
                     f"supported: {sorted(known_down | known_up)}.")
  attention_levels = tuple(t == _CROSS_DOWN for t in down)
  if tuple(t == _CROSS_UP for t in reversed(up)) != attention_levels:
    raise UserInputError(f"up_block_types {up} do not mirror down_block_types {down}.")
  mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
  if mid not in ("UNetMidBlock2DCrossAttn", None):
    raise UserInputError(f"Unsupported mid_block_type {mid!r}.")
  if not isinstance(cfg.get("layers_per_block", 2), int):
    raise UserInputError(f"layers_per_block per level ({cfg['layers_per_block']}) is not supported.")
  # diffusers' attention_head_dim historically holds the number of heads (kept for compatibility).
  heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
  depth = cfg.get("transformer_layers_per_block", 1)
  kwargs = dict(
      in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
      block_out_channels=tuple(cfg["block_out_channels"]), attention_levels=attention_levels,
      layers_per_block=cfg.get("layers_per_block", 2),
      num_heads=tuple(heads) if isinstance(heads, (list, tuple)) else int(heads), head_dim=None,
      transformer_depth=tuple(depth) if isinstance(depth, (list, tuple)) else int(depth),
      cross_attention_dim=int(cfg.get("cross_attention_dim", 1280)),
      use_linear_projection=bool(cfg.get("use_linear_projection", False)),
      upcast_attention=bool(cfg.get("upcast_attention", False)),
      num_class_embeds=cfg.get("num_class_embeds"), mid_block_attention=mid is not None,
      norm_num_groups=cfg.get("norm_num_groups", 32), norm_eps=cfg.get("norm_eps", 1e-5),
      flip_sin_to_cos=cfg.get("flip_sin_to_cos", True), freq_shift=cfg.get("freq_shift", 0),
      only_cross_attention=_bool_or_tuple(cfg.get("only_cross_attention", False)))
  kwargs.update(overrides)
  return UNet2DConditionModel(**kwargs)


def _bool_or_tuple(value: Any) -> Any:
  """A per-level flag as the hashable value our module fields hold."""
  if isinstance(value, (list, tuple)):
    return tuple(bool(v) for v in value)
  return bool(value)


def unet_to_diffusers_config(unet: UNet2DConditionModel, sample_size: int) -> Dict[str, Any]:
  """The diffusers config dict that describes `unet` (the inverse of `unet_from_diffusers_config`)."""
  heads = [h for h, _ in heads_per_level(unet.block_out_channels, unet.num_heads, unet.head_dim)]
  depth = unet.transformer_depth
  return {
      "_class_name": "UNet2DConditionModel", "sample_size": sample_size,
      "in_channels": unet.in_channels, "out_channels": unet.out_channels,
      "down_block_types": [_CROSS_DOWN if a else _PLAIN_DOWN for a in unet.attention_levels],
      "up_block_types": [_CROSS_UP if a else _PLAIN_UP for a in reversed(unet.attention_levels)],
      "mid_block_type": "UNetMidBlock2DCrossAttn" if unet.mid_block_attention else None,
      "block_out_channels": list(unet.block_out_channels), "layers_per_block": unet.layers_per_block,
      "attention_head_dim": heads if len(set(heads)) > 1 else heads[0],
      "transformer_layers_per_block": list(depth) if not isinstance(depth, int) else depth,
      "cross_attention_dim": unet.cross_attention_dim,
      "use_linear_projection": unet.use_linear_projection,
      "upcast_attention": unet.upcast_attention, "num_class_embeds": unet.num_class_embeds,
      "norm_num_groups": unet.norm_num_groups, "norm_eps": unet.norm_eps,
      "flip_sin_to_cos": unet.flip_sin_to_cos, "freq_shift": unet.freq_shift,
      "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1,
      "mid_block_scale_factor": 1, "dropout": unet.dropout,
      "only_cross_attention": (list(unet.only_cross_attention)
                               if not isinstance(unet.only_cross_attention, bool)
                               else unet.only_cross_attention),
  }


def check_autoencoder_blocks(cfg: Dict[str, Any], what: str) -> None:
  """Refuses activations and block types our encoder/decoder (AutoencoderKL, VQModel) lacks."""
  if cfg.get("act_fn", "silu") != "silu":
    raise UserInputError(f"Unsupported {what} act_fn {cfg['act_fn']!r}; only 'silu'.")
  bad = [t for t in cfg.get("down_block_types", []) if t != "DownEncoderBlock2D"]
  bad += [t for t in cfg.get("up_block_types", []) if t != "UpDecoderBlock2D"]
  if bad:
    raise UserInputError(f"Unsupported {what} block types {sorted(set(bad))}.")


def autoencoder_fields(cfg: Dict[str, Any], latent_channels: int) -> Dict[str, Any]:
  """Module fields shared by AutoencoderKL and VQModel, read from a diffusers config."""
  return dict(
      in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
      block_out_channels=tuple(cfg.get("block_out_channels", (64,))),
      layers_per_block=cfg.get("layers_per_block", 1),
      latent_channels=cfg.get("latent_channels", latent_channels),
      norm_num_groups=cfg.get("norm_num_groups", 32),
      mid_block_attention=cfg.get("mid_block_add_attention", True))


def autoencoder_config(module: Any, class_name: str, sample_size: int,
                       scaling_factor: float) -> Dict[str, Any]:
  """The diffusers config keys shared by AutoencoderKL and VQModel, describing `module`."""
  levels = len(module.block_out_channels)
  return {
      "_class_name": class_name, "sample_size": sample_size,
      "in_channels": module.in_channels, "out_channels": module.out_channels,
      "down_block_types": ["DownEncoderBlock2D"] * levels,
      "up_block_types": ["UpDecoderBlock2D"] * levels,
      "block_out_channels": list(module.block_out_channels),
      "layers_per_block": module.layers_per_block, "act_fn": "silu",
      "latent_channels": module.latent_channels, "norm_num_groups": module.norm_num_groups,
      "scaling_factor": float(scaling_factor), "mid_block_add_attention": module.mid_block_attention,
  }


def vae_from_diffusers_config(cfg: Dict[str, Any], **overrides) -> AutoencoderKL:
  """Builds our AutoencoderKL from a diffusers `AutoencoderKL` config dict."""
  check_autoencoder_blocks(cfg, "VAE")
  if cfg.get("use_post_quant_conv", True) != cfg.get("use_quant_conv", True):
    raise UserInputError("use_quant_conv and use_post_quant_conv must agree.")
  kwargs = dict(autoencoder_fields(cfg, latent_channels=4),
                use_quant_conv=cfg.get("use_quant_conv", True))
  kwargs.update(overrides)
  return AutoencoderKL(**kwargs)


def vae_to_diffusers_config(vae: AutoencoderKL, sample_size: int, scaling_factor: float) -> Dict[str, Any]:
  """The diffusers config dict that describes `vae`."""
  return {**autoencoder_config(vae, "AutoencoderKL", sample_size, scaling_factor),
          "use_quant_conv": vae.use_quant_conv, "use_post_quant_conv": vae.use_quant_conv}


def vq_to_diffusers_config(vq: VQModel, sample_size: int, scaling_factor: float) -> Dict[str, Any]:
  """The diffusers `VQModel` config dict that describes `vq`."""
  return {**autoencoder_config(vq, "VQModel", sample_size, scaling_factor),
          "num_vq_embeddings": vq.num_vq_embeddings, "vq_embed_dim": vq.embed_dim,
          "norm_type": "group", "lookup_from_codebook": False, "force_upcast": False}
