"""Attention in cache-sized tiles with a hand-written backward: the CPU kernel of "chunked".

softmax(q k^T / sqrt(d)) v is computed one tile at a time: `c` queries of `g` (image, head) rows
against all keys, at most `block_bytes` of logits, so the [B, H, Lq, Lk] logits never exist at
once. The forward keeps per query only the row maximum and the log of the exponentials' sum; the
backward (a `jax.custom_vjp`) recomputes each tile's probabilities from them in one pass and forms
the gradients as flash attention does:

  p = exp(s - m - log l);  dv = p^T do;  dp = do v^T;  ds = p * (dp - rowsum(do * o));
  dq = ds k / sqrt(d);  dk = ds^T q / sqrt(d).

Written out this way the backward makes two elementwise passes over a tile's logits where JAX's
automatic derivative of the softmax makes several, and the two products with a transposed tile
(dv, dk) are taken as `do^T p` and `q^T ds` (the tile's own layout, then a [D, Lk] transpose):
XLA:CPU runs `p^T do` about 4x slower, packing the transposed tile first.

Tiles hold every image of a few heads where a head's logits fit `block_bytes` (one loop over
heads, or none). Longer sequences are tiled by (image, head) rows of `block_bytes / 2`, one row of
1,024 x 1,024 float32 logits per tile at SD's first level: 1.4x faster in the forward at 16
images than tiles of every image of a head and a block of queries (bench/attention_blocks.py).
Under a mesh of several devices (`jax.set_mesh`, as the trainer and sampler trace) tiles always
keep every image, so a batch sharded over the mesh stays sharded through the loops.
"""

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

# Bytes of logits one tile holds at most (compute dtype). Tiles of every image of a few heads use
# all of it; tiles of single (image, head) rows half: one row at SD's first level (1,024 tokens,
# float32). Both measured fastest on a 2-core Xeon (bench/attention_blocks.py).
BLOCK_BYTES = 8 * 2**20
# From this many keys the forward takes each query's sum of exponentials from the product with
# [v, 1] instead of a separate reduction over the tile: at 1,024 keys 8.5 against 10.3 ms for
# [2, 1024, 8, 8], 69 against 77 ms for 16 images; at 77 keys (cross-attention) the separate sum
# is faster, 1.1 against 2.0 ms (2-core Xeon, XLA:CPU).
ROW_SUM_IN_PRODUCT_MIN_KEYS = 512


def plan_tiles(batch: int, heads: int, lq: int, lk: int, itemsize: int,
               block_bytes: int) -> tuple[int, int]:
  """(rows per tile, queries per tile) for `heads` rows of `batch` images each: divisors of
  `heads` and `lq` whose tile of logits fits `block_bytes`; one row and one query where nothing
  fits."""
  per_row = batch * lq * lk * itemsize
  if per_row <= block_bytes:
    return max(g for g in range(1, heads + 1) if heads % g == 0 and g * per_row <= block_bytes), lq
  per_query = batch * lk * itemsize
  fits = [c for c in range(1, lq + 1) if lq % c == 0 and c * per_query <= block_bytes]
  return 1, max(fits, default=1)


def _logits(qt, k, mt):
  s = jnp.einsum("gbqd,gbkd->gbqk", qt, k)
  return s if mt is None else jnp.where(mt, s, jnp.finfo(s.dtype).min)


def _tile_forward(qt, k, v, mt):
  """One tile: the output [g, B, c, D], the row maximum and the log of the row sum [g, B, c]."""
  s = _logits(qt, k, mt)
  m = s.max(axis=-1)
  e = jnp.exp(s - m[..., None])
  if k.shape[-2] >= ROW_SUM_IN_PRODUCT_MIN_KEYS:
    # A column of ones rides along with the values: the row sums come out of the product.
    ones = jnp.ones(v.shape[:-1] + (1,), v.dtype)
    weighted = jnp.einsum("gbqk,gbkd->gbqd", e, jnp.concatenate([v, ones], axis=-1))
    total = weighted[..., -1]
    out = weighted[..., :-1] / total[..., None]
  else:
    total = e.sum(axis=-1)
    out = jnp.einsum("gbqk,gbkd->gbqd", e, v) / total[..., None]
  return out, m, jnp.log(total)


def _transposed(x):
  """x with its last two axes swapped, as a transpose of its own: without the barrier XLA folds
  the transpose into the product that made x, back into the slow `p^T do` form."""
  return jax.lax.optimization_barrier(x).swapaxes(-1, -2)


def _tile_backward(qt, k, v, mt, m, log_total, do, dd):
  """One tile's gradients: d(scaled q) [g, B, c, D] and its share of dk, dv [g, B, Lk, D]."""
  s = _logits(qt, k, mt)
  p = jnp.exp((s - m[..., None]) - log_total[..., None])
  dv = _transposed(jnp.einsum("gbqd,gbqk->gbdk", do, p))
  dp = jnp.einsum("gbqd,gbkd->gbqk", do, v)
  ds = p * (dp - dd[..., None])
  if mt is not None:  # a fully masked row's uniform weights do not depend on its logits
    ds = jnp.where(mt, ds, 0)
  dq = jnp.einsum("gbqk,gbkd->gbqd", ds, k)
  dk = _transposed(jnp.einsum("gbqd,gbqk->gbdk", qt, ds))
  return dq, dk, dv


def _split_queries(x, n):
  """[g, B, Lq, ...] -> [n, g, B, Lq / n, ...]."""
  g, b, lq = x.shape[:3]
  return jnp.moveaxis(x.reshape((g, b, n, lq // n) + x.shape[3:]), 2, 0)


def _join_queries(x):
  """[n, g, B, c, ...] -> [g, B, n * c, ...]."""
  x = jnp.moveaxis(x, 0, 2)
  return x.reshape(x.shape[:2] + (x.shape[2] * x.shape[3],) + x.shape[4:])


def _over_groups(fn, xs):
  """fn over the leading (head-group) axis of every array in xs: a loop unless there is one group."""
  if jax.tree.leaves(xs)[0].shape[0] == 1:
    return jax.tree.map(lambda t: t[None], fn(jax.tree.map(lambda t: t[0], xs)))
  return jax.lax.map(fn, xs)


def _forward(q, k, v, mask, n):
  def group(xs):
    qg, kg, vg, mg = xs
    if n == 1:
      return _tile_forward(qg, kg, vg, mg)
    tiles = (_split_queries(qg, n), None if mg is None else _split_queries(mg, n))
    outs = jax.lax.map(lambda t: _tile_forward(t[0], kg, vg, t[1]), tiles)
    return tuple(_join_queries(o) for o in outs)
  return _over_groups(group, (q, k, v, mask))


def _backward(q, k, v, mask, m, log_total, do, dd, n):
  def group(xs):
    qg, kg, vg, mg, mm, ll, dog, ddg = xs
    if n == 1:
      return _tile_backward(qg, kg, vg, mg, mm, ll, dog, ddg)
    tiles = tuple(None if t is None else _split_queries(t, n) for t in (qg, mg, mm, ll, dog, ddg))
    dq, dk, dv = jax.lax.map(
        lambda t: _tile_backward(t[0], kg, vg, t[1], t[2], t[3], t[4], t[5]), tiles)
    return _join_queries(dq), dk.sum(axis=0), dv.sum(axis=0)
  return _over_groups(group, (q, k, v, mask, m, log_total, do, dd))


def _rows_per_tile_image() -> bool:
  """Whether the loop may run over images as well as heads: not under a mesh of several devices,
  whose batch axis may be sharded (a loop over a sharded axis would gather it)."""
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.empty or mesh.size == 1


def _to_groups(x, g, fold):
  """[B, L, H, ...] -> [rows / g, g, images per tile, L, ...]: rows are the heads (fold False) or
  the (image, head) pairs with one image per tile (fold True)."""
  if fold:
    x = jnp.moveaxis(x, 2, 1)  # [B, H, L, ...]
    x = x.reshape((x.shape[0] * x.shape[1], 1) + x.shape[2:])
  else:
    x = jnp.moveaxis(x, 2, 0)  # [H, B, L, ...]
  return x.reshape((x.shape[0] // g, g) + x.shape[1:])


def _from_groups(x, heads, fold):
  """The inverse of _to_groups: [rows / g, g, images per tile, L, ...] -> [B, L, H, ...]."""
  x = x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])
  if fold:  # [B * H, 1, L, ...]
    x = x.reshape((x.shape[0] // heads, heads) + x.shape[2:])
    return jnp.moveaxis(x, 1, 2)
  return jnp.moveaxis(x, 0, 2)  # [H, B, L, ...]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, mask, upcast, block_bytes):
  # Not differentiated (sampling): the forward alone, in the tiles it runs fastest in.
  out, _, _, plan = _tiled_forward(q, k, v, mask, upcast, block_bytes, inference=True)
  return _from_groups(out, q.shape[2], plan[0]).astype(v.dtype)


def choose_tiles(b, h, lq, lk, itemsize, block_bytes, inference=False):
  """(fold, rows per tile, queries per tile) for [b, lq, h, .] queries and lk keys; fold: the rows
  are (image, head) pairs with one image per tile, else heads with every image.

  A forward that will not be differentiated takes single (image, head) rows as soon as one row's
  logits fill half a block (SD's first level at 2 images: 9.4 ms against 12.3 ms for tiles of a
  head's 2 images, bench/attention_blocks.py --batch 2); the backward is faster in the larger
  tiles, so a differentiated forward keeps them.
  """
  g, c = plan_tiles(b, h, lq, lk, itemsize, block_bytes)
  half = block_bytes // 2
  large_rows = inference and lq * lk * itemsize >= half
  if (c < lq or large_rows) and _rows_per_tile_image():
    return (True,) + plan_tiles(1, b * h, lq, lk, itemsize, half)
  return False, g, c


def _prepare(q, k, v, mask, upcast, block_bytes, plan=None, inference=False):
  """The inputs in tile layout, and the plan (fold, rows per tile, queries per tile)."""
  b, lq, h, d = q.shape
  lk = k.shape[1]
  compute = jnp.float32 if upcast else q.dtype
  fold, g, c = plan or choose_tiles(b, h, lq, lk, jnp.dtype(compute).itemsize, block_bytes,
                                    inference)
  scale = 1.0 / math.sqrt(d)
  qg = _to_groups(q.astype(compute) * scale, g, fold)
  kg, vg = _to_groups(k.astype(compute), g, fold), _to_groups(v.astype(compute), g, fold)
  mg = None
  if mask is not None:  # [B, H, Lq, Lk] -> [B, Lq, H, Lk], then grouped like q
    mask = jnp.moveaxis(jnp.broadcast_to(mask, (b, h, lq, lk)), 1, 2)
    mg = _to_groups(mask, g, fold)
  return (qg, kg, vg, mg), (fold, g, c), scale


def _tiled_forward(q, k, v, mask, upcast, block_bytes, inference=False):
  """The output in tile layout, its row maxima and log-sums, and the tile plan."""
  (qg, kg, vg, mg), plan, _ = _prepare(q, k, v, mask, upcast, block_bytes, inference=inference)
  return _forward(qg, kg, vg, mg, q.shape[1] // plan[2]) + (plan,)


def _attention_fwd(q, k, v, mask, upcast, block_bytes):
  out, m, log_total, plan = _tiled_forward(q, k, v, mask, upcast, block_bytes)
  # The plan travels with the residuals as an empty array's shape: the backward may be traced
  # outside the mesh context the forward saw.
  plan_shape = jnp.zeros((int(plan[0]), plan[1], plan[2], 0), jnp.int8)
  return (_from_groups(out, q.shape[2], plan[0]).astype(v.dtype),
          (q, k, v, mask, out, m, log_total, plan_shape))


def _attention_bwd(upcast, block_bytes, residuals, g_out):
  q, k, v, mask, out, m, log_total, plan_shape = residuals
  fold, g, c = bool(plan_shape.shape[0]), plan_shape.shape[1], plan_shape.shape[2]
  (qg, kg, vg, mg), _, scale = _prepare(q, k, v, mask, upcast, block_bytes, (fold, g, c))
  h = q.shape[2]
  do = _to_groups(g_out.astype(out.dtype), g, fold)
  # rowsum(do * o) as a product over the head dim: XLA:CPU's reduction of the elementwise product
  # over that small minor axis ran 10-25x slower (12 ms of 60 for 16 images of 1,024 x 77).
  dd = jnp.einsum("...d,...d->...", do.astype(jnp.float32), out.astype(jnp.float32),
                  precision=jax.lax.Precision.HIGHEST).astype(out.dtype)
  dq, dk, dv = _backward(qg, kg, vg, mg, m, log_total, do, dd, q.shape[1] // c)
  return ((_from_groups(dq, h, fold) * scale).astype(q.dtype),
          _from_groups(dk, h, fold).astype(k.dtype), _from_groups(dv, h, fold).astype(v.dtype),
          None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def blocked_attention(q, k, v, mask: Optional[jnp.ndarray] = None, upcast: bool = True,
                      block_bytes: Optional[int] = None):
  """softmax(q k^T / sqrt(d)) v in tiles of at most `block_bytes` of logits; see the module
  docstring.

  Args:
    q, k, v: [B, Lq, H, D], [B, Lk, H, D], [B, Lk, H, D].
    mask: optional boolean mask broadcastable to [B, H, Lq, Lk]; True means "may attend".
    upcast: logits and softmax in float32 whatever the inputs' dtype.
    block_bytes: logits per tile; default BLOCK_BYTES.

  Returns:
    [B, Lq, H, D] in the dtype of `v`.
  """
  if mask is not None:
    mask = jnp.asarray(mask, bool)
  return _attention(q, k, v, mask, upcast, BLOCK_BYTES if block_bytes is None else block_bytes)
