"""The VQ-regularized autoencoder of latent diffusion (diffusers `VQModel` layout).

The encoder maps an image [B, H, W, 3] in [-1, 1] to pre-quantization latents [B, H/f, W/f, d]
(after `quant_conv`); the quantizer snaps each latent vector to its nearest codebook entry, and the
decoder maps (quantized) latents back. As in diffusers and the LDM paper, quantization is the first
step of `decode`, so a diffusion model trained on pre-quantization latents decodes through it.

Module tree (= diffusers keys): encoder, quant_conv, quantize.embedding, post_quant_conv, decoder.
"""

from typing import Any, Dict, Sequence

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp

from latent_diffusion_jax.models import layers
from latent_diffusion_jax.models.autoencoder import Decoder, Encoder

Dtype = Any


@struct.dataclass
class Quantized:
  """What the quantizer returns.

  Attributes:
    latents: quantized latents with straight-through gradients: their value is the codebook
      entry, their gradient flows to the encoder output unchanged.
    indices: int32 codebook index per latent position [B, h, w].
    codebook_loss: per example, mean over latent elements of ||sg(z) - e||^2 (moves the codebook).
    commitment_loss: per example, mean over latent elements of ||z - sg(e)||^2 (moves the encoder).
    perplexity: exp(entropy) of the batch's code usage; the number of codes in effective use.
  """
  latents: jnp.ndarray
  indices: jnp.ndarray
  codebook_loss: jnp.ndarray
  commitment_loss: jnp.ndarray
  perplexity: jnp.ndarray


def nearest_codes(z: jnp.ndarray, codebook: jnp.ndarray) -> jnp.ndarray:
  """Index of the nearest codebook row (Euclidean) for each vector z[..., d]."""
  flat = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  # ||z||^2 is constant per row, so it does not change the argmin.
  dist = jnp.sum(codebook**2, axis=-1)[None, :] - 2.0 * flat @ codebook.T
  return jnp.argmin(dist, axis=-1).astype(jnp.int32).reshape(z.shape[:-1])


def code_perplexity(indices: jnp.ndarray, num_embeddings: int) -> jnp.ndarray:
  """exp(entropy) of the empirical code distribution of `indices`."""
  counts = jnp.zeros((num_embeddings,), jnp.float32).at[indices.reshape(-1)].add(1.0)
  p = counts / jnp.maximum(jnp.sum(counts), 1.0)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


class VectorQuantizer(nn.Module):
  """Codebook of `num_embeddings` vectors of size `embedding_dim` (diffusers `VectorQuantizer`)."""
  num_embeddings: int
  embedding_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = layers.embed(self.num_embeddings, self.embedding_dim, dtype=self.dtype,
                                  param_dtype=self.param_dtype)

  def codebook(self) -> jnp.ndarray:
    return self.embedding.embedding

  def __call__(self, z: jnp.ndarray) -> Quantized:
    """Quantizes z [B, h, w, d]."""
    codebook = self.embedding.embedding
    indices = nearest_codes(jax.lax.stop_gradient(z), codebook)
    z_q = jnp.take(codebook, indices, axis=0).astype(z.dtype)
    axes = tuple(range(1, z.ndim))
    z32, q32 = z.astype(jnp.float32), z_q.astype(jnp.float32)
    codebook_loss = jnp.mean((jax.lax.stop_gradient(z32) - q32) ** 2, axis=axes)
    commitment_loss = jnp.mean((z32 - jax.lax.stop_gradient(q32)) ** 2, axis=axes)
    straight_through = z + jax.lax.stop_gradient(z_q - z)
    return Quantized(latents=straight_through, indices=indices, codebook_loss=codebook_loss,
                     commitment_loss=commitment_loss,
                     perplexity=code_perplexity(indices, self.num_embeddings))


def codebook_statistics(z: jnp.ndarray, indices: jnp.ndarray,
                        num_embeddings: int) -> Dict[str, jnp.ndarray]:
  """Per-code assignment counts [n] and sums of assigned vectors [n, d] of one batch."""
  flat = jax.lax.stop_gradient(z).reshape(-1, z.shape[-1]).astype(jnp.float32)
  idx = indices.reshape(-1)
  counts = jnp.zeros((num_embeddings,), jnp.float32).at[idx].add(1.0)
  sums = jnp.zeros((num_embeddings, flat.shape[-1]), jnp.float32).at[idx].add(flat)
  return {"counts": counts, "sums": sums}


def init_codebook_ema(codebook: jnp.ndarray) -> Dict[str, jnp.ndarray]:
  """EMA statistics that reproduce `codebook` exactly: one unit of mass per code."""
  return {"cluster_size": jnp.ones(codebook.shape[:1], jnp.float32),
          "embed_sum": jnp.asarray(codebook, jnp.float32)}


def ema_codebook_update(ema: Dict[str, jnp.ndarray], batch_stats: Dict[str, jnp.ndarray],
                        decay: float, epsilon: float = 1e-5):
  """One EMA step of the codebook (van den Oord et al. 2017, appendix; VQ-VAE-2).

    N_i <- decay N_i + (1 - decay) n_i          m_i <- decay m_i + (1 - decay) sum_{z -> i} z
    e_i  = m_i / N~_i,   N~_i = (N_i + eps) / (sum_j N_j + n eps) * sum_j N_j

  The Laplace smoothing (N~) keeps codes that receive nothing from dividing by zero.

  Args:
    ema: {"cluster_size": [n], "embed_sum": [n, d]}.
    batch_stats: `codebook_statistics` of the batch ({"counts", "sums"}).
    decay: EMA decay.
    epsilon: Laplace smoothing constant.

  Returns:
    (new ema statistics, new codebook [n, d] in float32).
  """
  size = decay * ema["cluster_size"] + (1.0 - decay) * batch_stats["counts"]
  embed_sum = decay * ema["embed_sum"] + (1.0 - decay) * batch_stats["sums"]
  total = jnp.sum(size)
  smoothed = (size + epsilon) / (total + size.shape[0] * epsilon) * total
  return {"cluster_size": size, "embed_sum": embed_sum}, embed_sum / smoothed[:, None]


class VQModel(nn.Module):
  """VQ autoencoder (diffusers `VQModel` with group norm, i.e. not MoVQ's spatial norm).

  Attributes:
    block_out_channels: channels per level; the downsampling factor is 2^(len-1).
    layers_per_block: ResNet blocks per encoder level (decoder levels use one more).
    latent_channels: channels of the encoder output and decoder input (LDM: z_channels).
    num_vq_embeddings: codebook size (LDM: n_embed).
    vq_embed_dim: codebook vector size (LDM: embed_dim); None means latent_channels.
    norm_num_groups: GroupNorm groups.
    mid_block_attention: self-attention in the mid-blocks.
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Sequence[int] = (128, 256, 512)
  layers_per_block: int = 2
  latent_channels: int = 3
  num_vq_embeddings: int = 8192
  vq_embed_dim: int | None = None
  norm_num_groups: int = 32
  mid_block_attention: bool = True
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def embed_dim(self) -> int:
    return self.vq_embed_dim or self.latent_channels

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    common = dict(block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                  groups=self.norm_num_groups, mid_block_attention=self.mid_block_attention,
                  attention_impl=self.attention_impl, **kw)
    self.encoder = Encoder(latent_channels=self.latent_channels, double_z=False, **common)
    self.quant_conv = layers.conv(self.embed_dim, (1, 1), padding="VALID", **kw)
    self.quantize = VectorQuantizer(self.num_vq_embeddings, self.embed_dim, **kw)
    self.post_quant_conv = layers.conv(self.latent_channels, (1, 1), padding="VALID", **kw)
    self.decoder = Decoder(out_channels=self.out_channels, **common)

  def encode(self, images: jnp.ndarray) -> jnp.ndarray:
    """Images [B, H, W, in_channels] -> pre-quantization latents [B, H/f, W/f, embed_dim]."""
    return self.quant_conv(self.encoder(images))

  def quantize_latents(self, latents: jnp.ndarray) -> Quantized:
    """Quantizes pre-quantization latents (straight-through gradients)."""
    return self.quantize(latents)

  def codebook(self) -> jnp.ndarray:
    """The codebook [num_vq_embeddings, embed_dim]."""
    return self.quantize.codebook()

  def decode(self, latents: jnp.ndarray, force_not_quantize: bool = False) -> jnp.ndarray:
    """Latents [B, h, w, embed_dim] -> images; quantizes them first unless `force_not_quantize`."""
    if not force_not_quantize:
      latents = self.quantize(latents).latents
    return self.decoder(self.post_quant_conv(latents))

  def __call__(self, images: jnp.ndarray, rng: jax.Array | None = None):
    """Reconstruction through the quantizer. `rng` is unused (the KL model's signature).

    Returns:
      (reconstruction, (pre-quantization latents, `Quantized`)).
    """
    del rng
    z = self.encode(images)
    quantized = self.quantize(z)
    return self.decode(quantized.latents, force_not_quantize=True), (z, quantized)
