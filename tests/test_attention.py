"""The "chunked" attention (query blocks, per-block recompute in the backward) against "xla":
values and gradients, with masks, causal, low precision, and which implementation "auto" picks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion_jax.models.attention import chunked_attention, dot_product_attention


def _qkv(seed, b=2, lq=24, lk=20, h=3, d=8, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(k, (b, l, h, d)).astype(dtype) * 2
               for k, l in zip(ks, (lq, lk, lk)))


# 2*3*20*4 bytes of logits per query: 1 KiB blocks hold 2 queries, so 24 queries make 12 blocks.
SMALL_BLOCKS = 1024


@pytest.mark.parametrize("masked", [False, True])
def test_chunked_equals_xla_over_many_blocks(masked):
  q, k, v = _qkv(0)
  mask = None
  if masked:  # per-batch, head-shared mask with every query seeing at least one key
    mask = jax.random.bernoulli(jax.random.key(1), 0.6, (2, 1, 24, 20)).at[..., 3].set(True)
  ref = dot_product_attention(q, k, v, mask=mask, implementation="xla")
  out = chunked_attention(q, k, v, mask, block_bytes=SMALL_BLOCKS)
  assert out.shape == ref.shape and out.dtype == ref.dtype
  np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)


def test_chunked_causal_and_uneven_block_sizes():
  q, k, v = _qkv(2, lq=21, lk=21)
  ref = dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  causal = jnp.tril(jnp.ones((21, 21), bool))  # a 2-D mask broadcasts like the 4-D one
  for block in (300, 700, 5000):  # 21 queries: blocks of 1, 3 (divisors of 21) and all
    np.testing.assert_allclose(chunked_attention(q, k, v, causal, block_bytes=block), ref,
                               atol=2e-6, rtol=1e-5)


def test_chunked_gradients_equal_xla():
  q, k, v = _qkv(3)
  w = jax.random.normal(jax.random.key(4), q.shape)

  def loss(impl, q, k, v):
    out = (chunked_attention(q, k, v, block_bytes=SMALL_BLOCKS) if impl == "chunked"
           else dot_product_attention(q, k, v, implementation="xla"))
    return (out * w).sum()

  ref = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
  got = jax.jit(jax.grad(lambda *a: loss("chunked", *a), argnums=(0, 1, 2)))(q, k, v)
  for g, r, name in zip(got, ref, "qkv"):
    assert float(jnp.abs(r).max()) > 1e-3, name  # a gradient that could be wrong
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-4, err_msg=f"d{name}")


def test_chunked_bfloat16_with_and_without_upcast():
  q, k, v = _qkv(5, dtype=jnp.bfloat16)
  ref = dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                              implementation="xla")
  for upcast in (True, False):
    out = chunked_attention(q, k, v, upcast=upcast, block_bytes=SMALL_BLOCKS)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=0.1)


def test_auto_is_chunked_on_cpu_only_where_logits_outgrow_a_block():
  assert jax.default_backend() == "cpu"
  is_blocked = lambda q: "scan" in str(jax.make_jaxpr(
      lambda q: dot_product_attention(q, q, q, implementation="auto"))(q))
  # SD's first level at 32x32 latents: 1024 tokens, 8 heads -> 64 MiB of logits for 2 images.
  assert is_blocked(jax.ShapeDtypeStruct((2, 1024, 8, 8), jnp.float32))
  assert not is_blocked(jax.ShapeDtypeStruct((2, 64, 8, 8), jnp.float32))


def test_auto_keeps_the_written_out_form_for_short_sequences_on_cpu():
  """The model default ("auto"): chunked only for long self-attention; the embedded demos' 8x8
  latents (64 tokens, batch 64) and cross-attention run exactly the "xla" form."""
  from latent_diffusion_jax.core.config import base_config
  from latent_diffusion_jax.models.attention import auto_implementation
  assert base_config().model.attention_impl == "auto"
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  assert auto_implementation(s(1, 1024, 8, 40), s(1, 1024, 8, 40)) == "chunked"
  assert auto_implementation(s(1, 512, 8, 40), s(1, 512, 8, 40)) == "chunked"
  assert auto_implementation(s(4, 256, 8, 40), s(4, 256, 8, 40)) == "xla"
  assert auto_implementation(s(4, 1024, 8, 40), s(4, 77, 8, 40)) == "xla"
  q, k, v = _qkv(3, b=64, lq=64, lk=64, h=4, d=16)
  np.testing.assert_array_equal(dot_product_attention(q, k, v, implementation="auto"),
                                dot_product_attention(q, k, v, implementation="xla"))
