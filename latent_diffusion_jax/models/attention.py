"""Scaled dot-product attention with implementations selected by config.

Implementations:
  "xla":     einsum + softmax written out, the softmax in float32 (`upcast`), runs everywhere.
  "jax":     `jax.nn.dot_product_attention` with XLA's own lowering.
  "cudnn":   `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash attention on NVIDIA
             GPUs (fp16/bf16 only; no arbitrary masks beyond causal).
  "chunked": the "xla" formula over blocks of queries (`lax.map`), each block's backward
             recomputing its probabilities (`jax.checkpoint`): the [B, H, Lq, Lk] logits never exist
             at once, and a block's logits stay in the CPU cache. Equal to "xla" up to rounding.
  "auto":    "cudnn" where it applies (GPU, half precision, no explicit mask); on CPU "chunked"
             for long sequences (one image-head's float32 logits >= CHUNK_MIN_LOGITS_BYTES, e.g.
             SD's 1024-token first level) and "xla" for short ones (cross-attention, the 8x8
             latents of the embedded demos), where the logits stay in cache; otherwise "jax".
             The model default.

Why "chunked" on CPU: XLA:CPU writes and rereads the full logits several times (scale, max,
exp, sum, normalize, and again in the backward). At SD's 32x32 latents (1024 tokens, 8 heads)
that is 32 MiB per image in float32, well beyond the cache, so the first-level attention ran 4-7x
slower than PyTorch's fused `scaled_dot_product_attention`. Blocks of LOGITS_BLOCK_BYTES keep the
exponentials in cache; the block count is a loop, so the compiled program stays small.
"""

import math
from typing import Optional

import jax
import jax.numpy as jnp
from latent_diffusion_jax.core.errors import UserInputError

IMPLEMENTATIONS = ("xla", "jax", "cudnn", "chunked", "auto")

# Bytes of float32 logits one "chunked" block holds (all batch rows and heads of a query block):
# about the size of an L2 cache, measured fastest on a 2-core EPYC (bench/attention_blocks.py).
LOGITS_BLOCK_BYTES = 2 * 2**20
# "auto" on CPU chunks self-attention from 512x512 tokens of logits per image and head (1 MiB in
# float32) up: measured faster at 1024 tokens; shorter sequences keep the written-out form.
CHUNK_MIN_LOGITS_BYTES = 2**20


def _xla_attention(q, k, v, mask, upcast: bool):
  # The logits are scaled and the weights normalized as written. Scaling q and normalizing the
  # output instead (the chunked kernel's form, `_block_attention`) is 1.75x faster per UNet call on
  # XLA:CPU at 1024 tokens (bench/attention_formulation.py); "auto" runs that form, chunked, for
  # long sequences only, and this one for the short sequences the embedded demos were measured
  # with (an epsilon-prediction `make demo` trained with the other form scored 75% against 95%).
  scale = 1.0 / math.sqrt(q.shape[-1])
  compute = jnp.float32 if upcast else q.dtype
  logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(compute), k.astype(compute)) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _block_attention(q, k, v, mask, upcast: bool):
  """Softmax(q k^T / sqrt(d)) v for one query block, normalizing the [.., D] output rather than
  the [.., Lk] weights (one multiply per output element instead of per logit)."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  compute = jnp.float32 if upcast else q.dtype
  logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(compute) * scale, k.astype(compute))
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  logits = logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
  e = jnp.exp(logits)
  out = jnp.einsum("bhqk,bkhd->bqhd", e.astype(v.dtype), v, preferred_element_type=compute)
  total = e.sum(axis=-1).transpose(0, 2, 1)[..., None]  # [B, Lq, H, 1]
  return (out / total).astype(v.dtype)


def _query_block(q, k, block_bytes: int) -> int:
  """The largest divisor of Lq whose block of logits (all batch rows and heads) fits block_bytes."""
  b, lq, h, _ = q.shape
  per_query = b * h * k.shape[1] * 4
  target = max(1, block_bytes // per_query)
  return max(c for c in range(1, min(lq, target) + 1) if lq % c == 0)


def chunked_attention(q, k, v, mask=None, upcast: bool = True,
                      block_bytes: Optional[int] = None):
  """Attention over query blocks of at most `block_bytes` of logits; see the module docstring.

  Args:
    q, k, v: [B, Lq, H, D], [B, Lk, H, D], [B, Lk, H, D].
    mask: optional boolean mask broadcastable to [B, H, Lq, Lk].
    upcast: logits and softmax in float32.
    block_bytes: float32 logits per block; default LOGITS_BLOCK_BYTES.

  Returns:
    [B, Lq, H, D] in the dtype of `v`.
  """
  b, lq, h, d = q.shape
  c = _query_block(q, k, LOGITS_BLOCK_BYTES if block_bytes is None else block_bytes)
  if c == lq:
    return _block_attention(q, k, v, mask, upcast)
  n = lq // c
  qs = q.reshape(b, n, c, h, d).swapaxes(0, 1)
  block = jax.checkpoint(lambda qb, mb: _block_attention(qb, k, v, mb, upcast))
  if mask is None:
    out = jax.lax.map(lambda qb: block(qb, None), qs)
  else:
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (lq, k.shape[1]))
    ms = mask.reshape(mask.shape[:2] + (n, c, k.shape[1])).transpose(2, 0, 1, 3, 4)
    out = jax.lax.map(lambda xs: block(*xs), (qs, ms))
  return out.swapaxes(0, 1).reshape(b, lq, h, d)


def _cudnn_applies(q, mask) -> bool:
  return (jax.default_backend() == "gpu" and mask is None
          and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] <= 128)


def auto_implementation(q: jnp.ndarray, k: jnp.ndarray, mask: Optional[jnp.ndarray] = None) -> str:
  """What "auto" runs for these shapes on this backend (see the module docstring)."""
  if _cudnn_applies(q, mask):
    return "cudnn"
  if jax.default_backend() == "cpu":
    return "chunked" if q.shape[1] * k.shape[1] * 4 >= CHUNK_MIN_LOGITS_BYTES else "xla"
  return "jax"


def dot_product_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
                          mask: Optional[jnp.ndarray] = None, is_causal: bool = False,
                          implementation: str = "xla", upcast: bool = True) -> jnp.ndarray:
  """Multi-head attention on [batch, length, heads, head_dim] tensors.

  Args:
    q: queries [B, Lq, H, D].
    k: keys [B, Lk, H, D].
    v: values [B, Lk, H, D].
    mask: optional boolean mask broadcastable to [B, H, Lq, Lk]; True means "may attend".
    is_causal: add a causal mask (query i attends to keys <= i).
    implementation: one of IMPLEMENTATIONS.
    upcast: compute logits and softmax in float32 (SD 2.x `upcast_attention`); "xla" and
      "chunked" honour it, the fused kernels always accumulate the softmax in float32.

  Returns:
    [B, Lq, H, D] in the dtype of `v`.
  """
  if implementation not in IMPLEMENTATIONS:
    raise UserInputError(f"Unknown attention implementation {implementation!r}; "
                     f"valid: {', '.join(IMPLEMENTATIONS)}.")
  if implementation == "auto":
    implementation = auto_implementation(q, k, mask)
  if implementation in ("xla", "chunked"):
    if is_causal:
      causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), dtype=bool))[None, None]
      mask = causal if mask is None else jnp.logical_and(mask, causal)
    if implementation == "chunked":
      return chunked_attention(q, k, v, mask, upcast)
    return _xla_attention(q, k, v, mask, upcast)
  if mask is not None:
    mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, is_causal=is_causal,
      implementation="cudnn" if implementation == "cudnn" else "xla")
