"""models/group_norm.GroupNorm: the function and parameters of flax's GroupNorm and torch's, in
float32 and bfloat16, forward and gradients, 4-D and 3-D inputs, and clear errors for bad shapes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion_jax.models.group_norm import GroupNorm


def _params(shape, groups, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(shape) * 3 + 2, jnp.float32)
  c = shape[-1]
  p = {"params": {"scale": jnp.asarray(1 + 0.2 * rng.standard_normal(c), jnp.float32),
                  "bias": jnp.asarray(0.3 * rng.standard_normal(c), jnp.float32)}}
  return x, p


@pytest.mark.parametrize("shape,groups", [((2, 8, 8, 64), 32), ((3, 5, 7, 48), 4), ((2, 17, 32), 8),
                                          ((2, 4, 4, 32), 32)])
def test_matches_flax_group_norm_forward_and_gradients(shape, groups):
  x, p = _params(shape, groups)
  ours, ref = GroupNorm(num_groups=groups, epsilon=1e-6), nn.GroupNorm(num_groups=groups, epsilon=1e-6)
  assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(
      ref.init(jax.random.key(0), x))
  np.testing.assert_allclose(ours.apply(p, x), ref.apply(p, x), atol=2e-5, rtol=1e-5)
  loss = lambda m: lambda p, x: (m.apply(p, x) ** 2 * jnp.cos(x)).sum()
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(p, x)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(p, x)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=2e-4 * float(jnp.abs(b).max()), rtol=1e-4)


def test_matches_torch_group_norm():
  torch = pytest.importorskip("torch")
  x, p = _params((2, 6, 6, 64), 32, seed=1)
  tnorm = torch.nn.GroupNorm(32, 64, eps=1e-6)
  with torch.no_grad():
    tnorm.weight.copy_(torch.from_numpy(np.array(p["params"]["scale"])))
    tnorm.bias.copy_(torch.from_numpy(np.array(p["params"]["bias"])))
    want = tnorm(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(GroupNorm(num_groups=32).apply(p, x), want, atol=2e-5, rtol=1e-5)


def test_bfloat16_input_keeps_float32_statistics_and_dtype_rules():
  x, p = _params((2, 8, 8, 64), 32, seed=2)
  xb = x.astype(jnp.bfloat16)
  ref = nn.GroupNorm(num_groups=32, epsilon=1e-6, dtype=jnp.bfloat16).apply(p, xb)
  got = GroupNorm(num_groups=32, dtype=jnp.bfloat16).apply(p, xb)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), ref.astype(jnp.float32), atol=0.05)
  # Without a dtype the output is the promoted dtype of input and parameters, as flax's.
  assert GroupNorm(num_groups=32).apply(p, xb).dtype == jnp.float32


def test_constant_groups_do_not_divide_by_zero():
  x = jnp.ones((2, 4, 4, 64)) * 7.0
  _, p = _params((2, 4, 4, 64), 32)
  y = GroupNorm(num_groups=32).apply(p, x)
  assert bool(jnp.isfinite(y).all())
  np.testing.assert_allclose(y, jnp.broadcast_to(p["params"]["bias"], y.shape), atol=1e-4)


def test_bad_shapes_raise_clear_errors():
  with pytest.raises(ValueError, match="do not divide 30 channels"):
    GroupNorm(num_groups=32).init(jax.random.key(0), jnp.ones((1, 4, 4, 30)))
  with pytest.raises(ValueError, match=r"\[batch, \.\.\., channels\]"):
    GroupNorm(num_groups=2).init(jax.random.key(0), jnp.ones((4,)))
