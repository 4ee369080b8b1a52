"""Scaled dot-product attention with implementations selected by config.

Implementations:
  "xla":     einsum + softmax written out, the softmax in float32 (`upcast`), runs everywhere.
  "jax":     `jax.nn.dot_product_attention` with XLA's own lowering.
  "cudnn":   `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash attention on NVIDIA
             GPUs (fp16/bf16 only; no arbitrary masks beyond causal).
  "chunked": tiles of (image, head) rows x a block of queries against all keys (`lax.map`;
             every image of a head per tile under a multi-device mesh), with a hand-written
             flash-style backward that recomputes each tile's probabilities from the saved row
             statistics (models/chunked_attention.py): the [B, H, Lq, Lk] logits never exist
             at once. Equal to "xla" up to rounding.
  "auto":    "cudnn" where it applies (GPU, half precision, no explicit mask); on CPU "chunked"
             where one image-head's float32 logits reach CHUNK_MIN_LOGITS_BYTES (SD's levels
             at 256 and 1024 tokens, their cross-attention) and "xla" for short sequences (the
             8x8 latents of the embedded demos, text encoders); otherwise "jax". The model
             default.

Why "chunked" on CPU: XLA:CPU writes and rereads the full logits several times (scale, max,
exp, sum, normalize, and again in the backward). At SD's 32x32 latents (1024 tokens, 8 heads)
that is 32 MiB per image in float32, so the first-level attention ran 4-7x slower than PyTorch's
fused `scaled_dot_product_attention`. Tiles of LOGITS_BLOCK_BYTES bound the memory; the tile
count is a loop, so the compiled program stays small. bench/attention_blocks.py times it.
"""

import math
from typing import Optional

import jax
import jax.numpy as jnp
from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.models.chunked_attention import BLOCK_BYTES, blocked_attention

IMPLEMENTATIONS = ("xla", "jax", "cudnn", "chunked", "auto")

# Bytes of logits one "chunked" tile holds at most (models/chunked_attention.py's BLOCK_BYTES;
# tests shrink it here).
LOGITS_BLOCK_BYTES = BLOCK_BYTES
# "auto" on CPU runs "chunked" from 128x128 tokens of logits per image and head (64 KiB in
# float32) up: measured faster from SD's 256-token second level and 1024x77 cross-attention on;
# the embedded demos' 64-token attention keeps the written-out form it was tuned with.
CHUNK_MIN_LOGITS_BYTES = 64 * 2**10


def _xla_attention(q, k, v, mask, upcast: bool):
  # The logits are scaled and the weights normalized as written. Scaling q and normalizing the
  # output instead (the chunked kernel's tile form) is 1.75x faster per UNet call on
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


def chunked_attention(q, k, v, mask=None, upcast: bool = True,
                      block_bytes: Optional[int] = None):
  """Attention in tiles of at most `block_bytes` of logits with a hand-written backward (see
  models/chunked_attention.py); equal to "xla" up to rounding.

  Args:
    q, k, v: [B, Lq, H, D], [B, Lk, H, D], [B, Lk, H, D].
    mask: optional boolean mask broadcastable to [B, H, Lq, Lk].
    upcast: logits and softmax in float32.
    block_bytes: logits per tile; default LOGITS_BLOCK_BYTES.

  Returns:
    [B, Lq, H, D] in the dtype of `v`.
  """
  return blocked_attention(q, k, v, mask, upcast,
                           LOGITS_BLOCK_BYTES if block_bytes is None else block_bytes)


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
