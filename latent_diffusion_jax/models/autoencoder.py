"""The KL-regularized autoencoder of latent diffusion (diffusers `AutoencoderKL` layout).

The encoder maps an image [B, H, W, 3] in [-1, 1] to the moments (mean, logvar) of a diagonal
Gaussian over latents [B, H/f, W/f, C] with f = 2^(levels-1); the decoder maps latents back.
"""

from typing import Any, Sequence

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp

from latent_diffusion_jax.models import layers
from latent_diffusion_jax.models.blocks import (Downsample2D, ResnetBlock2D, SpatialSelfAttention,
                                                Upsample2D)

Dtype = Any


class _EncoderLevel(nn.Module):
  out_channels: int
  num_layers: int
  downsample: bool
  groups: int
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, 1e-6, name=f"resnets_{i}", **kw)(x)
    if self.downsample:
      x = Downsample2D(self.out_channels, asymmetric_pad=True, name="downsamplers_0", **kw)(x)
    return x


class _DecoderLevel(nn.Module):
  out_channels: int
  num_layers: int
  upsample: bool
  groups: int
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, 1e-6, name=f"resnets_{i}", **kw)(x)
    if self.upsample:
      x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
    return x


class _MidBlock(nn.Module):
  channels: int
  groups: int
  attention: bool
  attention_impl: str
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = ResnetBlock2D(self.channels, self.groups, 1e-6, name="resnets_0", **kw)(x)
    if self.attention:
      x = SpatialSelfAttention(1, self.groups, 1e-6, self.attention_impl, name="attentions_0", **kw)(x)
    return ResnetBlock2D(self.channels, self.groups, 1e-6, name="resnets_1", **kw)(x)


class Encoder(nn.Module):
  """Image -> 2*latent_channels moments (before `quant_conv`); latent_channels when not `double_z`."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  groups: int = 32
  # False for the VQ model, whose encoder emits latents rather than Gaussian moments.
  double_z: bool = True
  mid_block_attention: bool = True
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    chans = tuple(self.block_out_channels)
    x = layers.conv(chans[0], name="conv_in", **kw)(x)
    for i, c in enumerate(chans):
      x = _EncoderLevel(c, self.layers_per_block, i < len(chans) - 1, self.groups,
                        name=f"down_blocks_{i}", **kw)(x)
      x = layers.constrain(x, ("batch", "height", "width", "act_embed"))
    x = _MidBlock(chans[-1], self.groups, self.mid_block_attention, self.attention_impl,
                  name="mid_block", **kw)(x)
    x = nn.silu(layers.group_norm(self.groups, 1e-6, name="conv_norm_out", **kw)(x))
    out = 2 * self.latent_channels if self.double_z else self.latent_channels
    return layers.conv(out, name="conv_out", **kw)(x)


class Decoder(nn.Module):
  """Latents (after `post_quant_conv`) -> image."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int = 3
  groups: int = 32
  mid_block_attention: bool = True
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    chans = tuple(reversed(self.block_out_channels))
    x = layers.conv(chans[0], name="conv_in", **kw)(z)
    x = _MidBlock(chans[0], self.groups, self.mid_block_attention, self.attention_impl,
                  name="mid_block", **kw)(x)
    for i, c in enumerate(chans):
      x = _DecoderLevel(c, self.layers_per_block + 1, i < len(chans) - 1, self.groups,
                        name=f"up_blocks_{i}", **kw)(x)
      x = layers.constrain(x, ("batch", "height", "width", "act_embed"))
    x = nn.silu(layers.group_norm(self.groups, 1e-6, name="conv_norm_out", **kw)(x))
    return layers.conv(self.out_channels, name="conv_out", **kw)(x)


@struct.dataclass
class DiagonalGaussian:
  """Diagonal Gaussian posterior from moments [..., 2C] (mean, logvar); logvar clipped to [-30, 20]."""
  moments: jnp.ndarray

  @property
  def mean(self) -> jnp.ndarray:
    return jnp.split(self.moments, 2, axis=-1)[0]

  @property
  def logvar(self) -> jnp.ndarray:
    return jnp.clip(jnp.split(self.moments, 2, axis=-1)[1], -30.0, 20.0)

  @property
  def std(self) -> jnp.ndarray:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, rng: jax.Array) -> jnp.ndarray:
    eps = jax.random.normal(rng, self.mean.shape, jnp.float32).astype(self.mean.dtype)
    return self.mean + self.std * eps

  def mode(self) -> jnp.ndarray:
    return self.mean

  def kl(self) -> jnp.ndarray:
    """KL(q || N(0, I)) per example, summed over all latent dimensions."""
    mean, logvar = self.mean.astype(jnp.float32), self.logvar.astype(jnp.float32)
    return 0.5 * jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar, axis=tuple(range(1, mean.ndim)))



class AutoencoderKL(nn.Module):
  """KL autoencoder. `encode` returns moments; `decode` maps latents to images in about [-1, 1].

  Attributes:
    block_out_channels: channels per level; the downsampling factor is 2^(len-1).
    layers_per_block: ResNet blocks per encoder level (decoder levels use one more).
    latent_channels: channels of the latent.
    norm_num_groups: GroupNorm groups.
    use_quant_conv: the 1x1 convs between the encoder/decoder and the latent.
    mid_block_attention: self-attention in the mid-blocks.
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  use_quant_conv: bool = True
  mid_block_attention: bool = True
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    common = dict(block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                  groups=self.norm_num_groups, mid_block_attention=self.mid_block_attention,
                  attention_impl=self.attention_impl, **kw)
    self.encoder = Encoder(latent_channels=self.latent_channels, **common)
    self.decoder = Decoder(out_channels=self.out_channels, **common)
    if self.use_quant_conv:
      self.quant_conv = layers.conv(2 * self.latent_channels, (1, 1), padding="VALID", **kw)
      self.post_quant_conv = layers.conv(self.latent_channels, (1, 1), padding="VALID", **kw)

  def encode(self, images: jnp.ndarray) -> jnp.ndarray:
    """Images [B, H, W, in_channels] -> posterior moments [B, H/f, W/f, 2*latent_channels]."""
    moments = self.encoder(images)
    return self.quant_conv(moments) if self.use_quant_conv else moments

  def decode(self, latents: jnp.ndarray) -> jnp.ndarray:
    """Unscaled latents [B, h, w, latent_channels] -> images [B, h*f, w*f, out_channels]."""
    if self.use_quant_conv:
      latents = self.post_quant_conv(latents)
    return self.decoder(latents)

  def __call__(self, images: jnp.ndarray, rng: jax.Array | None = None):
    """Reconstruction; samples the posterior when `rng` is given, else uses its mode.

    Returns:
      (reconstruction, posterior moments).
    """
    moments = self.encode(images)
    posterior = DiagonalGaussian(moments)
    z = posterior.sample(rng) if rng is not None else posterior.mode()
    return self.decode(z), moments
