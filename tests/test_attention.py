"""The "chunked" attention (tiles of heads x queries, a hand-written backward that recomputes each
tile) against "xla": values and gradients, with masks (fully masked rows too), causal, several
heads per tile, low precision, under a sharded batch, and which implementation "auto" picks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion_jax.models.attention import chunked_attention, dot_product_attention


def _qkv(seed, b=2, lq=24, lk=20, h=3, d=8, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(k, (b, l, h, d)).astype(dtype) * 2
               for k, l in zip(ks, (lq, lk, lk)))


# 2*20*4 bytes of logits per query and head: 1 KiB tiles hold 6 queries of one head, so the 24
# queries and 3 heads make 12 tiles.
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
  for block in (300, 700, 5000):  # 21 queries per tile: 1, 3 (divisors of 21) and all
    np.testing.assert_allclose(chunked_attention(q, k, v, causal, block_bytes=block), ref,
                               atol=2e-6, rtol=1e-5)


def _gradients(q, k, v, mask, w, impl, block_bytes=SMALL_BLOCKS):
  def loss(q, k, v):
    out = (chunked_attention(q, k, v, mask, block_bytes=block_bytes) if impl == "chunked"
           else dot_product_attention(q, k, v, mask=mask, implementation="xla"))
    return (out.astype(jnp.float32) * w).sum()
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


# 2*24*20*4 = 3840 bytes of logits per head: tiles of one query, of 6 queries, of a whole head, and
# of all three heads.
@pytest.mark.parametrize("block_bytes", [160, SMALL_BLOCKS, 3840, 3 * 3840])
def test_chunked_gradients_equal_xla(block_bytes):
  q, k, v = _qkv(3)
  w = jax.random.normal(jax.random.key(4), q.shape)
  ref = _gradients(q, k, v, None, w, "xla")
  got = _gradients(q, k, v, None, w, "chunked", block_bytes)
  for g, r, name in zip(got, ref, "qkv"):
    assert float(jnp.abs(r).max()) > 1e-3, name  # a gradient that could be wrong
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-4, err_msg=f"d{name}")


def test_chunked_gradients_equal_xla_with_masks_and_a_fully_masked_row():
  q, k, v = _qkv(6)
  w = jax.random.normal(jax.random.key(7), q.shape)
  mask = jax.random.bernoulli(jax.random.key(8), 0.5, (2, 3, 24, 20)).at[..., 5].set(True)
  mask = mask.at[1, 2, 7].set(False)  # query 7 of image 1, head 2 sees no key: uniform weights
  ref = _gradients(q, k, v, mask, w, "xla")
  got = _gradients(q, k, v, mask, w, "chunked")
  for g, r, name in zip(got, ref, "qkv"):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-4, err_msg=f"d{name}")
  np.testing.assert_allclose(chunked_attention(q, k, v, mask, block_bytes=SMALL_BLOCKS)[1, 7, 2],
                             v[1, :, 2].mean(0), atol=1e-5)


def test_tile_plan_fits_the_budget_and_divides_the_work():
  from latent_diffusion_jax.core import parallel
  from latent_diffusion_jax.models.chunked_attention import BLOCK_BYTES, choose_tiles, plan_tiles
  # SD's first level at batch 4, float32: a head's logits (16 MiB) outgrow a tile, so tiles of
  # one (image, head) row (4 MiB); under an 8-device mesh, every image of one head and 512 queries.
  assert choose_tiles(4, 8, 1024, 1024, 4, BLOCK_BYTES) == (True, 1, 1024)
  with parallel.mesh_context(parallel.create_mesh((-1, 1, 1))):
    assert choose_tiles(4, 8, 1024, 1024, 4, BLOCK_BYTES) == (False, 1, 512)
  assert choose_tiles(4, 8, 256, 256, 4, BLOCK_BYTES) == (False, 8, 256)  # every head in one tile
  assert plan_tiles(2, 6, 64, 64, 4, 3 * 2 * 64 * 64 * 4) == (3, 64)
  assert plan_tiles(1, 1, 21, 21, 4, 10) == (1, 1)  # nothing fits: the smallest tile
  # Two images (guided sampling at batch 1): one head's logits fit a tile, but a forward that is
  # not differentiated takes single (image, head) rows once a row fills half the budget.
  assert choose_tiles(2, 8, 1024, 1024, 4, BLOCK_BYTES) == (False, 1, 1024)
  assert choose_tiles(2, 8, 1024, 1024, 4, BLOCK_BYTES, inference=True) == (True, 1, 1024)
  assert choose_tiles(2, 8, 1024, 77, 4, BLOCK_BYTES, inference=True) == (False, 8, 1024)
  with parallel.mesh_context(parallel.create_mesh((-1, 1, 1))):  # a sharded batch stays whole
    assert choose_tiles(2, 8, 1024, 1024, 4, BLOCK_BYTES, inference=True) == (False, 1, 1024)


def test_forward_alone_takes_its_own_tiles_and_matches_the_differentiated_one():
  """Not differentiated, the forward runs in (image, head) rows; differentiated, in tiles of a
  head's images: the same values either way, and the gradients still match "xla"."""
  q, k, v = _qkv(11, b=2, lq=32, lk=32, h=2)
  block = 2 * 32 * 32 * 4  # one head's two images fit; one row fills half
  alone = lambda q: chunked_attention(q, k, v, block_bytes=block)
  jaxpr = str(jax.make_jaxpr(alone)(q)).replace(" ", "")
  assert "f32[4,1,1,32,8]" in jaxpr and "f32[2,1,2,32,8]" not in jaxpr
  grad_jaxpr = str(jax.make_jaxpr(jax.grad(lambda q: alone(q).sum()))(q)).replace(" ", "")
  assert "f32[2,1,2,32,8]" in grad_jaxpr
  ref = dot_product_attention(q, k, v, implementation="xla")
  out, vjp = jax.vjp(alone, q)
  np.testing.assert_allclose(jax.jit(alone)(q), ref, atol=1e-5)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  w = jax.random.normal(jax.random.key(12), q.shape)
  want = jax.grad(lambda q: (dot_product_attention(q, k, v, implementation="xla") * w).sum())(q)
  np.testing.assert_allclose(vjp(w)[0], want, atol=1e-5)


def test_chunked_keeps_a_sharded_batch_and_its_values():
  from jax.sharding import NamedSharding, PartitionSpec as P
  from latent_diffusion_jax.core import parallel
  q, k, v = _qkv(9, b=8, lq=32, lk=32, h=2)
  mesh = parallel.create_mesh((-1, 1, 1))
  sharding = NamedSharding(mesh, P("data"))
  put = lambda x: jax.device_put(x, sharding)
  w = jax.random.normal(jax.random.key(10), q.shape)
  f = jax.jit(lambda q, k, v: jax.value_and_grad(
      lambda q: (chunked_attention(q, k, v, block_bytes=SMALL_BLOCKS) * w).sum())(q))
  shapes = lambda: str(jax.make_jaxpr(
      lambda q: chunked_attention(q, q, q, block_bytes=SMALL_BLOCKS))(q)).replace(" ", "")
  assert "f32[16,1,1,32,8]" in shapes()  # no mesh: tiles of (image, head) rows, one image each
  with parallel.mesh_context(mesh):  # as the trainer traces: every image of a head in each tile
    assert "f32[2,1,8,32,8]" in shapes() and "f32[16,1,1,32,8]" not in shapes()
    (val, grad) = f(put(q), put(k), put(v))
  ref_val, ref_grad = jax.value_and_grad(
      lambda q: (dot_product_attention(q, k, v, implementation="xla") * w).sum())(q)
  np.testing.assert_allclose(val, ref_val, rtol=1e-5)
  np.testing.assert_allclose(grad, ref_grad, atol=1e-5, rtol=1e-4)
  assert grad.sharding.is_equivalent_to(sharding, grad.ndim)


def test_chunked_bfloat16_with_and_without_upcast():
  q, k, v = _qkv(5, dtype=jnp.bfloat16)
  ref = dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                              implementation="xla")
  for upcast in (True, False):
    out = chunked_attention(q, k, v, upcast=upcast, block_bytes=SMALL_BLOCKS)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=0.1)
    grads = jax.grad(lambda q, k, v: chunked_attention(q, k, v, upcast=upcast).astype(
        jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)
    assert all(g.dtype == jnp.bfloat16 and bool(jnp.isfinite(g.astype(jnp.float32)).all())
               for g in grads)


def test_auto_is_chunked_on_cpu_only_where_logits_outgrow_a_block():
  assert jax.default_backend() == "cpu"
  is_blocked = lambda q: "scan" in str(jax.make_jaxpr(
      lambda q: dot_product_attention(q, q, q, implementation="auto"))(q))
  # SD's first level at 32x32 latents: 1024 tokens, 8 heads -> 64 MiB of logits for 2 images.
  assert is_blocked(jax.ShapeDtypeStruct((2, 1024, 8, 8), jnp.float32))
  assert not is_blocked(jax.ShapeDtypeStruct((2, 64, 8, 8), jnp.float32))


def test_auto_keeps_the_written_out_form_for_short_sequences_on_cpu():
  """The model default ("auto"): chunked from 128x128 tokens of logits per image-head (SD's 1024-
  and 256-token levels and their cross-attention to 77 tokens); the embedded demos' 8x8 latents
  (64 tokens, batch 64) and short text run exactly the "xla" form."""
  from latent_diffusion_jax.core.config import base_config
  from latent_diffusion_jax.models.attention import auto_implementation
  assert base_config().model.attention_impl == "auto"
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  assert auto_implementation(s(1, 1024, 8, 40), s(1, 1024, 8, 40)) == "chunked"
  assert auto_implementation(s(1, 512, 8, 40), s(1, 512, 8, 40)) == "chunked"
  assert auto_implementation(s(4, 256, 8, 40), s(4, 256, 8, 40)) == "chunked"
  assert auto_implementation(s(4, 1024, 8, 40), s(4, 77, 8, 40)) == "chunked"
  assert auto_implementation(s(4, 64, 8, 40), s(4, 64, 8, 40)) == "xla"
  assert auto_implementation(s(4, 77, 12, 64), s(4, 77, 12, 64)) == "xla"
  q, k, v = _qkv(3, b=64, lq=64, lk=64, h=4, d=16)
  np.testing.assert_array_equal(dot_product_attention(q, k, v, implementation="auto"),
                                dot_product_attention(q, k, v, implementation="xla"))


def test_chunked_backward_traced_outside_the_forwards_mesh():
  """The tile plan travels with the residuals: a vjp taken under a mesh (tiles of every image,
  masked) and applied outside it gives the "xla" gradients."""
  from latent_diffusion_jax.core import parallel
  q, k, v = _qkv(11, b=4)
  mask = jax.random.bernoulli(jax.random.key(12), 0.7, (4, 3, 24, 20)).at[..., 0].set(True)
  w = jax.random.normal(jax.random.key(13), q.shape)
  with parallel.mesh_context(parallel.create_mesh((-1, 1, 1))):
    out, vjp = jax.vjp(lambda q, k, v: chunked_attention(q, k, v, mask, block_bytes=SMALL_BLOCKS),
                       q, k, v)
  got = vjp(w)
  ref = jax.vjp(lambda q, k, v: dot_product_attention(q, k, v, mask=mask, implementation="xla"),
                q, k, v)[1](w)
  np.testing.assert_allclose(out, dot_product_attention(q, k, v, mask=mask, implementation="xla"),
                             atol=2e-6, rtol=1e-5)
  for g, r, name in zip(got, ref, "qkv"):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-4, err_msg=f"d{name}")


@pytest.mark.parametrize("masked", [False, True])
def test_row_sums_taken_in_the_product_match_xla(monkeypatch, masked):
  """From ROW_SUM_IN_PRODUCT_MIN_KEYS keys the forward takes the sums of exponentials from the
  product with [v, 1]: values and gradients as "xla", a fully masked row included."""
  from latent_diffusion_jax.models import chunked_attention as ca
  monkeypatch.setattr(ca, "ROW_SUM_IN_PRODUCT_MIN_KEYS", 1)
  q, k, v = _qkv(13)
  mask = None
  if masked:
    mask = jax.random.bernoulli(jax.random.key(14), 0.6, (2, 3, 24, 20)).at[1, 2, 5].set(False)
  w = jax.random.normal(jax.random.key(15), q.shape)
  loss = lambda impl: lambda q, k, v: (dot_product_attention(q, k, v, mask=mask, implementation=impl) * w).sum()
  np.testing.assert_allclose(chunked_attention(q, k, v, mask, block_bytes=SMALL_BLOCKS),
                             dot_product_attention(q, k, v, mask=mask, implementation="xla"), atol=1e-5)
  got = jax.grad(lambda q, k, v: (chunked_attention(q, k, v, mask, block_bytes=SMALL_BLOCKS) * w).sum(),
                 argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-4)
