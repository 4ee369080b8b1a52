"""The PatchGAN discriminator of the LDM / taming-transformers first-stage losses (pix2pix layout).

conv4x4/2 -> LeakyReLU, then (num_layers - 1) x [conv4x4/2 -> norm -> LeakyReLU], then
conv4x4/1 -> norm -> LeakyReLU, then conv4x4/1 to one logit per patch. Each logit sees a
receptive field of 70x70 pixels for num_layers=3, so realism is judged locally, per patch.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from latent_diffusion_jax.models import layers
from latent_diffusion_jax.core.errors import UserInputError

Dtype = Any


class BatchStatNorm(nn.Module):
  """BatchNorm as a discriminator uses it in training mode: statistics of the current batch.

  The reference keeps running averages too, but they only serve an eval mode in which the
  discriminator never runs, so none are kept. Under jit the mean is over the global batch on any
  mesh, so sharded and single-device steps agree. (layers.py has no batch norm; the scale and bias
  carry the "norm" logical axis like every other norm parameter.)
  """
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                       (c,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                      (c,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(0, 1, 2))
    var = jnp.mean((x32 - mean) ** 2, axis=(0, 1, 2))
    y = (x32 - mean) * (jnp.asarray(scale, jnp.float32) / jnp.sqrt(var + self.epsilon))
    return (y + jnp.asarray(bias, jnp.float32)).astype(self.dtype)


class PatchDiscriminator(nn.Module):
  """PatchGAN: images [B, H, W, C] in [-1, 1] -> logits [B, h, w, 1] (one per patch).

  Attributes:
    channels: width of the first layer (ndf); layer k has channels * min(2^k, 8).
    num_layers: downsampling depth (3 in LDM: 30x30 logits for 256x256 images, 2x2 for 32x32).
    norm: "batch" (batch statistics, the reference) or "group" (GroupNorm, batch-independent).
  """
  channels: int = 64
  num_layers: int = 3
  norm: str = "batch"
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _norm(self, name: str):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    if self.norm == "batch":
      return BatchStatNorm(**kw)
    if self.norm == "group":
      return layers.group_norm(self.norm_num_groups, 1e-5, **kw)
    raise UserInputError(f"Unknown discriminator norm {self.norm!r}; valid: batch, group.")

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    pad = ((1, 1), (1, 1))
    x = images.astype(self.dtype)
    x = layers.conv(self.channels, (4, 4), strides=(2, 2), padding=pad, name="conv_0", **kw)(x)
    x = nn.leaky_relu(x, 0.2)
    for i in range(1, self.num_layers + 1):
      width = self.channels * min(2**i, 8)
      stride = 2 if i < self.num_layers else 1
      # No bias before a norm that subtracts the mean: its gradient would be rounding noise,
      # which Adam would turn into full-size random updates.
      x = layers.conv(width, (4, 4), strides=(stride, stride), padding=pad,
                      use_bias=self.norm != "batch", name=f"conv_{i}", **kw)(x)
      x = nn.leaky_relu(self._norm(f"norm_{i}")(x), 0.2)
      x = layers.constrain(x, ("batch", "height", "width", "act_embed"))
    x = layers.conv(1, (4, 4), padding=pad, name=f"conv_{self.num_layers + 1}", **kw)(x)
    return x.astype(jnp.float32)
