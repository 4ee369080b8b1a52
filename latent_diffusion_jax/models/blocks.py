"""Convolutional building blocks shared by the autoencoder and the UNet (diffusers' module names)."""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from latent_diffusion_jax.models import layers
from latent_diffusion_jax.models.attention import dot_product_attention
from latent_diffusion_jax.models.upsample import NearestUpsampleConv

Dtype = Any


class ResnetBlock2D(nn.Module):
  """GroupNorm-SiLU-conv twice, optional time-embedding injection, 1x1 shortcut on width change."""
  out_channels: int
  groups: int = 32
  eps: float = 1e-6
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb: Optional[jnp.ndarray] = None, deterministic: bool = True):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.group_norm(self.groups, self.eps, name="norm1", **kw)(x)
    h = layers.conv(self.out_channels, name="conv1", **kw)(nn.silu(h))
    if temb is not None:
      t = layers.dense(self.out_channels, ("mlp", "embed"), name="time_emb_proj", **kw)(nn.silu(temb))
      h = h + t[:, None, None, :]
    h = layers.group_norm(self.groups, self.eps, name="norm2", **kw)(h)
    h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=deterministic)
    h = layers.conv(self.out_channels, name="conv2", **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = layers.conv(self.out_channels, (1, 1), padding="VALID", name="conv_shortcut", **kw)(x)
    return x + h


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv. `asymmetric_pad` pads right/bottom only (the autoencoder's variant)."""
  out_channels: int
  asymmetric_pad: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    padding = ((0, 1), (0, 1)) if self.asymmetric_pad else ((1, 1), (1, 1))
    return layers.conv(self.out_channels, strides=(2, 2), padding=padding, name="conv",
                       dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour 2x upsampling followed by a 3x3 conv, computed at the input's size
  (models/upsample.py)."""
  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return NearestUpsampleConv(self.out_channels, name="conv", dtype=self.dtype,
                               param_dtype=self.param_dtype)(x)


class SpatialSelfAttention(nn.Module):
  """Single-block self-attention over pixels with a residual (the autoencoder's mid-block attention)."""
  heads: int = 1
  groups: int = 32
  eps: float = 1e-6
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = x.shape
    y = layers.group_norm(self.groups, self.eps, name="group_norm", **kw)(x).reshape(b, h * w, c)
    split = lambda t: t.reshape(b, h * w, self.heads, c // self.heads)
    q = split(layers.dense(c, ("embed", "heads"), name="to_q", **kw)(y))
    k = split(layers.dense(c, ("embed", "heads"), name="to_k", **kw)(y))
    v = split(layers.dense(c, ("embed", "heads"), name="to_v", **kw)(y))
    o = dot_product_attention(q, k, v, implementation=self.attention_impl).reshape(b, h * w, c)
    o = layers.dense(c, ("heads", "embed"), name="to_out_0", **kw)(o)
    return x + o.reshape(b, h, w, c)
