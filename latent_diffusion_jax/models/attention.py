"""Scaled dot-product attention with implementations selected by config.

Implementations:
  "xla":     einsum + softmax written out, the softmax in float32 (`upcast`), runs everywhere.
  "jax":     `jax.nn.dot_product_attention` with XLA's own lowering.
  "cudnn":   `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash attention on NVIDIA
             GPUs (fp16/bf16 only; no arbitrary masks beyond causal).
  "auto":    "cudnn" where it applies (GPU, half precision, no explicit mask), otherwise "jax".
"""

import math
from typing import Optional

import jax
import jax.numpy as jnp
from latent_diffusion_jax.core.errors import UserInputError

IMPLEMENTATIONS = ("xla", "jax", "cudnn", "auto")


def _xla_attention(q, k, v, mask, upcast: bool):
  scale = 1.0 / math.sqrt(q.shape[-1])
  compute = jnp.float32 if upcast else q.dtype
  logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(compute), k.astype(compute)) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _cudnn_applies(q, mask) -> bool:
  return (jax.default_backend() == "gpu" and mask is None
          and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] <= 128)


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
    upcast: compute logits and softmax in float32 (SD 2.x `upcast_attention`); "xla" honours it,
      the fused kernels always accumulate the softmax in float32.

  Returns:
    [B, Lq, H, D] in the dtype of `v`.
  """
  if implementation not in IMPLEMENTATIONS:
    raise UserInputError(f"Unknown attention implementation {implementation!r}; "
                     f"valid: {', '.join(IMPLEMENTATIONS)}.")
  if implementation == "auto":
    implementation = "cudnn" if _cudnn_applies(q, mask) else "jax"
  if implementation == "xla":
    if is_causal:
      causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), dtype=bool))[None, None]
      mask = causal if mask is None else jnp.logical_and(mask, causal)
    return _xla_attention(q, k, v, mask, upcast)
  if mask is not None:
    mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, is_causal=is_causal,
      implementation="cudnn" if implementation == "cudnn" else "xla")
