"""SpatialTransformer (diffusers `Transformer2DModel`) with self-, cross-attention and GEGLU blocks."""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from latent_diffusion_jax.models import layers
from latent_diffusion_jax.models.attention import dot_product_attention

Dtype = Any


class Attention(nn.Module):
  """Multi-head attention; keys/values come from `context` when given (cross-attention)."""
  heads: int
  head_dim: int
  upcast: bool = False
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context: Optional[jnp.ndarray] = None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
    inner = self.heads * self.head_dim
    context = x if context is None else context
    split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim)
    q = split(layers.dense(inner, ("embed", "heads"), name="to_q", **kw)(x))
    k = split(layers.dense(inner, ("embed", "heads"), name="to_k", **kw)(context))
    v = split(layers.dense(inner, ("embed", "heads"), name="to_v", **kw)(context))
    o = dot_product_attention(q, k, v, implementation=self.attention_impl, upcast=self.upcast)
    o = o.reshape(o.shape[0], o.shape[1], inner)
    return layers.dense(x.shape[-1], ("heads", "embed"), name="to_out_0", dtype=self.dtype,
                        param_dtype=self.param_dtype)(o)


class GEGLU(nn.Module):
  """Gated GELU projection to `features` (one linear layer producing value and gate)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = layers.dense(2 * self.features, ("embed", "mlp"), name="proj", dtype=self.dtype,
                     param_dtype=self.param_dtype)(x)
    value, gate = jnp.split(h, 2, axis=-1)
    return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GEGLU(x.shape[-1] * self.mult, name="net_0", **kw)(x)
    return layers.dense(x.shape[-1], ("mlp", "embed"), name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LN self-attention, cross-attention to the context, and GEGLU feed-forward, each residual.

  `only_cross_attention` makes the first attention attend to the context too (diffusers'
  only_cross_attention, the original `disable_self_attn`; the SD x4 upscaler's upper levels).
  """
  heads: int
  head_dim: int
  upcast_attention: bool = False
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  only_cross_attention: bool = False

  @nn.compact
  def __call__(self, x, context, deterministic: bool = True):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = dict(heads=self.heads, head_dim=self.head_dim, upcast=self.upcast_attention,
                attention_impl=self.attention_impl, **kw)
    first_context = context if self.only_cross_attention else None
    x = x + Attention(name="attn1", **attn)(layers.layer_norm(name="norm1", **kw)(x),
                                            first_context)
    x = x + Attention(name="attn2", **attn)(layers.layer_norm(name="norm2", **kw)(x), context)
    return x + FeedForward(name="ff", **kw)(layers.layer_norm(name="norm3", **kw)(x))


class Transformer2D(nn.Module):
  """GroupNorm, projection in (1x1 conv or linear), `depth` transformer blocks, projection out, residual."""
  heads: int
  head_dim: int
  depth: int = 1
  use_linear_projection: bool = False
  upcast_attention: bool = False
  groups: int = 32
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  only_cross_attention: bool = False

  @nn.compact
  def __call__(self, x, context, deterministic: bool = True):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = x.shape
    inner = self.heads * self.head_dim
    y = layers.group_norm(self.groups, 1e-6, name="norm", **kw)(x)
    if self.use_linear_projection:
      y = layers.dense(inner, ("embed", "heads"), name="proj_in", **kw)(y.reshape(b, h * w, c))
    else:
      y = layers.conv(inner, (1, 1), padding="VALID", name="proj_in", **kw)(y).reshape(b, h * w, inner)
    y = layers.constrain(y, ("batch", "length", "act_embed"))
    for i in range(self.depth):
      y = BasicTransformerBlock(self.heads, self.head_dim, self.upcast_attention,
                                self.attention_impl, name=f"transformer_blocks_{i}",
                                only_cross_attention=self.only_cross_attention, **kw)(
                                    y, context, deterministic)
    if self.use_linear_projection:
      y = layers.dense(c, ("heads", "embed"), name="proj_out", **kw)(y).reshape(b, h, w, c)
    else:
      y = layers.conv(c, (1, 1), padding="VALID", name="proj_out", **kw)(y.reshape(b, h, w, inner))
    return x + y
