"""Time-conditional UNet with cross-attention (diffusers `UNet2DConditionModel` layout).

Levels with `attention_levels[i]` true are CrossAttnDown/UpBlock2D (a Transformer2D after each
ResNet block); the others are plain Down/UpBlock2D. The SD 1.x and 2.x UNets differ only in config:
head count vs head dimension, conv vs linear projections, context width and attention upcasting.
"""

import dataclasses
import math
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp

from latent_diffusion_jax.models import layers
from latent_diffusion_jax.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D
from latent_diffusion_jax.models.transformer import Transformer2D
from latent_diffusion_jax.core.errors import UserInputError

Dtype = Any
IntOrSeq = Union[int, Sequence[int]]


def timestep_embedding(t: jnp.ndarray, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> jnp.ndarray:
  """Sinusoidal embedding of (possibly fractional) timesteps [B] -> [B, dim], in float32."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _per_level(value: IntOrSeq, levels: int, what: str) -> Tuple[int, ...]:
  if isinstance(value, int):
    return (value,) * levels
  value = tuple(value)
  if len(value) != levels:
    raise UserInputError(f"{what} has {len(value)} entries {value}; expected one per level ({levels}).")
  return value


def heads_per_level(block_out_channels: Sequence[int], num_heads: Optional[IntOrSeq],
                    head_dim: Optional[int]) -> Tuple[Tuple[int, int], ...]:
  """(heads, head_dim) for each level from either a head count (SD 1.x) or a head width (SD 2.x)."""
  if (num_heads is None) == (head_dim is None):
    raise UserInputError(f"Give exactly one of num_heads ({num_heads}) and head_dim ({head_dim}).")
  out = []
  if head_dim is not None:
    for c in block_out_channels:
      if c % head_dim:
        raise UserInputError(f"head_dim {head_dim} does not divide level width {c}.")
      out.append((c // head_dim, head_dim))
  else:
    for c, h in zip(block_out_channels, _per_level(num_heads, len(block_out_channels), "num_heads")):
      if c % h:
        raise UserInputError(f"num_heads {h} does not divide level width {c}.")
      out.append((h, c // h))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class _Shared:
  """Settings every block of the UNet shares (a plain value, so it is no submodule)."""
  norm_num_groups: int
  norm_eps: float
  dropout: float
  use_linear_projection: bool
  upcast_attention: bool
  mid_block_attention: bool
  remat: bool
  attention_impl: str
  dtype: Any
  param_dtype: Any


class _Level(nn.Module):
  """One down or up level: ResNet blocks, each optionally followed by a Transformer2D, then resampling."""
  out_channels: int
  num_layers: int
  attention: bool
  heads: int
  head_dim: int
  depth: int
  resample: Optional[str]  # "down", "up" or None
  up: bool
  cfg: _Shared
  only_cross_attention: bool = False

  @nn.compact
  def __call__(self, h, temb, context, skips, deterministic):
    cfg = self.cfg
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    resnet_cls = nn.remat(ResnetBlock2D, static_argnums=(3,)) if cfg.remat else ResnetBlock2D
    attn_cls = nn.remat(Transformer2D, static_argnums=(3,)) if cfg.remat else Transformer2D
    outputs = []
    for i in range(self.num_layers):
      if self.up:
        h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = resnet_cls(self.out_channels, cfg.norm_num_groups, cfg.norm_eps, cfg.dropout,
                     name=f"resnets_{i}", **kw)(h, temb, deterministic)
      if self.attention:
        h = attn_cls(self.heads, self.head_dim, self.depth, cfg.use_linear_projection,
                     cfg.upcast_attention, cfg.norm_num_groups, cfg.attention_impl,
                     name=f"attentions_{i}", only_cross_attention=self.only_cross_attention,
                     **kw)(h, context, deterministic)
      h = layers.constrain(h, ("batch", "height", "width", "act_embed"))
      outputs.append(h)
    if self.resample == "down":
      h = Downsample2D(self.out_channels, name="downsamplers_0", **kw)(h)
      outputs.append(h)
    elif self.resample == "up":
      h = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(h)
    return h, outputs


class UNet2DConditionModel(nn.Module):
  """Denoiser eps/v/x0(x_t, t, context[, class_labels]) on NHWC latents.

  Attributes:
    in_channels: latent channels plus any concatenated conditioning (e.g. 9 for SD inpainting).
    out_channels: predicted channels.
    block_out_channels: widths of the levels.
    attention_levels: whether each level has cross-attention transformers.
    layers_per_block: ResNet blocks per down level (up levels use one more).
    num_heads: attention heads (int or per level), SD 1.x style; exclusive with head_dim.
    head_dim: attention head width, SD 2.x style; exclusive with num_heads.
    transformer_depth: transformer blocks per Transformer2D (int or per level).
    cross_attention_dim: width of the context (text embeddings).
    use_linear_projection: linear instead of 1x1-conv proj_in/proj_out (SD 2.x).
    upcast_attention: compute attention logits in float32 (SD 2.1).
    num_class_embeds: number of class labels for a class embedding added to the time embedding.
    mid_block_attention: cross-attention in the mid-block.
    remat: rematerialize ResNet and transformer blocks in the backward pass (saves memory).
    only_cross_attention: per level (or one bool): the transformers' first attention attends to
      the context instead of the image (diffusers' only_cross_attention; the SD x4 upscaler).
  """
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  attention_levels: Sequence[bool] = (True, True, True, False)
  layers_per_block: int = 2
  num_heads: Optional[IntOrSeq] = 8
  head_dim: Optional[int] = None
  transformer_depth: IntOrSeq = 1
  cross_attention_dim: int = 768
  use_linear_projection: bool = False
  upcast_attention: bool = False
  num_class_embeds: Optional[int] = None
  mid_block_attention: bool = True
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  dropout: float = 0.0
  remat: bool = False
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  only_cross_attention: Union[bool, Sequence[bool]] = False

  @nn.compact
  def __call__(self, sample: jnp.ndarray, timesteps: jnp.ndarray, context: jnp.ndarray,
               class_labels: Optional[jnp.ndarray] = None, deterministic: bool = True,
               down_block_additional_residuals: Optional[Sequence[jnp.ndarray]] = None,
               mid_block_additional_residual: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Predicts the diffusion target.

    Args:
      sample: noisy latents [B, h, w, in_channels].
      timesteps: [B] or scalar, integer or float.
      context: [B, L, cross_attention_dim] text embeddings.
      class_labels: [B] ints when `num_class_embeds` is set.
      deterministic: disables dropout.
      down_block_additional_residuals: a ControlNet's residuals, one per skip connection (conv_in,
        every down-level ResNet/transformer output and downsampler, in that order), added to the
        skips after the last down level, as diffusers adds them.
      mid_block_additional_residual: a ControlNet's residual, added to the mid-block output.

    Returns:
      [B, h, w, out_channels].
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    chans = tuple(self.block_out_channels)
    levels = len(chans)
    layout = level_layout(self)
    temb = embed_time(self, timesteps, sample.shape[0], class_labels)
    context = context.astype(self.dtype)

    h = layers.conv(chans[0], name="conv_in", **kw)(sample.astype(self.dtype))
    h, skips = down_levels(self, layout, h, temb, context, deterministic)
    if down_block_additional_residuals is not None:
      if len(down_block_additional_residuals) != len(skips):
        raise UserInputError(f"Got {len(down_block_additional_residuals)} down-block residuals; "
                             f"this UNet has {len(skips)} skip connections.")
      skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_block_additional_residuals)]
    h = mid_block(self, layout, h, temb, context, deterministic)
    if mid_block_additional_residual is not None:
      h = h + mid_block_additional_residual.astype(h.dtype)

    for i, c in enumerate(reversed(chans)):
      level = levels - 1 - i
      h, _ = _Level(c, self.layers_per_block + 1, self.attention_levels[level], layout.heads[level][0],
                    layout.heads[level][1], layout.depth[level], "up" if i < levels - 1 else None,
                    True, layout.shared, layout.only_cross[level],
                    name=f"up_blocks_{i}")(h, temb, context, skips, deterministic)

    h = nn.silu(layers.group_norm(self.norm_num_groups, self.norm_eps, name="conv_norm_out", **kw)(h))
    return layers.conv(self.out_channels, name="conv_out", **kw)(h)


# The encoder half below (time embedding, down levels, mid block) is shared with the ControlNet
# (models/controlnet.py), whose copy of it must hold the same parameter names. Each function is
# called from inside a compact `__call__` of `m` (a UNet or a ControlNet; both carry the layout
# fields read here), so the submodules it creates are `m`'s.


@dataclasses.dataclass(frozen=True)
class LevelLayout:
  """Per-level attention settings and the shared block settings of a UNet-like module."""
  heads: Tuple[Tuple[int, int], ...]
  depth: Tuple[int, ...]
  shared: _Shared
  only_cross: Tuple[bool, ...] = ()


def level_layout(m: nn.Module) -> LevelLayout:
  """Validates `m`'s level fields and returns its per-level layout."""
  chans = tuple(m.block_out_channels)
  if len(m.attention_levels) != len(chans):
    raise UserInputError(f"attention_levels {tuple(m.attention_levels)} needs one entry per level "
                         f"of block_out_channels {chans}.")
  only_cross = getattr(m, "only_cross_attention", False)
  only_cross = (tuple(bool(v) for v in only_cross) if not isinstance(only_cross, bool)
                else (only_cross,) * len(chans))
  if len(only_cross) != len(chans):
    raise UserInputError(f"only_cross_attention {only_cross} needs one entry per level.")
  return LevelLayout(
      heads_per_level(chans, m.num_heads, m.head_dim),
      _per_level(m.transformer_depth, len(chans), "transformer_depth"),
      _Shared(m.norm_num_groups, m.norm_eps, m.dropout, m.use_linear_projection,
              m.upcast_attention, m.mid_block_attention, m.remat, m.attention_impl, m.dtype,
              m.param_dtype),
      only_cross)


def embed_time(m: nn.Module, timesteps, batch: int, class_labels) -> jnp.ndarray:
  """The time (plus class) embedding [B, 4 * block_out_channels[0]] ("time_embedding",
  "class_embedding")."""
  kw = dict(dtype=m.dtype, param_dtype=m.param_dtype)
  width = m.block_out_channels[0]
  timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
  temb = timestep_embedding(timesteps, width, m.flip_sin_to_cos, m.freq_shift)
  temb_dim = 4 * width
  temb = _TimestepMLP(temb_dim, name="time_embedding", **kw)(temb.astype(m.dtype))
  if m.num_class_embeds is not None:
    if class_labels is None:
      raise UserInputError("This UNet has a class embedding (num_class_embeds="
                           f"{m.num_class_embeds}); pass class_labels.")
    temb = temb + layers.embed(m.num_class_embeds, temb_dim, axes=("vocab", "mlp"),
                               name="class_embedding", **kw)(class_labels)
  return temb


def down_levels(m: nn.Module, layout: LevelLayout, h, temb, context, deterministic):
  """The down levels ("down_blocks_i") on the conv_in output `h`.

  Returns:
    (the last level's output, the skip connections: `h` then each level's outputs).
  """
  chans = tuple(m.block_out_channels)
  skips = [h]
  for i, c in enumerate(chans):
    h, outs = _Level(c, m.layers_per_block, m.attention_levels[i], layout.heads[i][0],
                     layout.heads[i][1], layout.depth[i], "down" if i < len(chans) - 1 else None,
                     False, layout.shared, layout.only_cross[i],
                     name=f"down_blocks_{i}")(h, temb, context, None, deterministic)
    skips.extend(outs)
  return h, skips


def mid_block(m: nn.Module, layout: LevelLayout, h, temb, context, deterministic):
  """The mid block ("mid_block")."""
  return _MidBlock(layout.heads[-1][0], layout.heads[-1][1], layout.depth[-1], layout.shared,
                   name="mid_block")(h, temb, context, deterministic)


class _TimestepMLP(nn.Module):
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.silu(layers.dense(self.features, ("embed", "mlp"), name="linear_1", **kw)(x))
    return layers.dense(self.features, ("mlp", "embed"), name="linear_2", **kw)(x)


class _MidBlock(nn.Module):
  heads: int
  head_dim: int
  depth: int
  cfg: _Shared

  @nn.compact
  def __call__(self, h, temb, context, deterministic):
    cfg = self.cfg
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    c = h.shape[-1]
    h = ResnetBlock2D(c, cfg.norm_num_groups, cfg.norm_eps, cfg.dropout, name="resnets_0", **kw)(
        h, temb, deterministic)
    if cfg.mid_block_attention:
      h = Transformer2D(self.heads, self.head_dim, self.depth, cfg.use_linear_projection,
                        cfg.upcast_attention, cfg.norm_num_groups, cfg.attention_impl,
                        name="attentions_0", **kw)(h, context, deterministic)
    return ResnetBlock2D(c, cfg.norm_num_groups, cfg.norm_eps, cfg.dropout, name="resnets_1", **kw)(
        h, temb, deterministic)
