"""Products computed in other forms, against XLA's plain ones: Dense layers and 1x1 convolutions
as matmuls over rows (layers.matmul_last_axis, layers.conv_general_dilated) and the
nearest-upsample conv at the input's size (models/upsample.py)."""

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion_jax.models import layers
from latent_diffusion_jax.models.blocks import Upsample2D
from latent_diffusion_jax.models.upsample import NearestUpsampleConv

NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # flax's 2-D numbers


def _normal(key, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(key), shape, dtype)


@pytest.mark.parametrize("kernel,strides,padding,groups,pointwise", [
    ((1, 1), (1, 1), "VALID", 1, True),
    ((1, 1), (1, 1), ((0, 0), (0, 0)), 1, True),
    ((1, 1), (2, 2), "VALID", 1, False),
    ((1, 1), (1, 1), ((1, 1), (1, 1)), 1, False),
    ((1, 1), (1, 1), "VALID", 2, False),
    ((3, 3), (1, 1), ((1, 1), (1, 1)), 1, False),
])
def test_conv_general_dilated_matches_lax(kernel, strides, padding, groups, pointwise):
  x = _normal(0, (2, 5, 6, 8))
  w = _normal(1, kernel + (8 // groups, 12))
  kw = dict(dimension_numbers=NHWC, feature_group_count=groups)
  assert layers._is_pointwise(w.shape, strides, padding, None, None, NHWC, groups, 1) == pointwise
  ours = lambda x, w: layers.conv_general_dilated(x, w, strides, padding, **kw)
  ref = lambda x, w: lax.conv_general_dilated(x, w, strides, padding, **kw)
  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
  loss = lambda f: jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1))
  for a, b in zip(loss(ours)(x, w), loss(ref)(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  text = jax.jit(ours).lower(x, w).as_text()
  assert ("convolution" not in text) == pointwise


def test_pointwise_check_needs_channels_last_and_unit_dilation():
  nchw = lax.ConvDimensionNumbers((0, 1, 2, 3), (0, 1, 2, 3), (0, 1, 2, 3))
  assert not layers._is_pointwise((1, 1, 4, 4), (1, 1), "VALID", None, None, nchw, 1, 1)
  assert not layers._is_pointwise((1, 1, 4, 4), (1, 1), "VALID", (2, 2), None, NHWC, 1, 1)
  assert not layers._is_pointwise((1, 1, 4, 4), (1, 1), "VALID", None, None, NHWC, 1, 2)
  assert not layers._is_pointwise((1, 1, 4, 4), (1, 1), "VALID", None, (2, 2), NHWC, 1, 1)
  assert layers._is_pointwise((1, 1, 4, 4), (1, 1), "VALID", (1, 1), (1, 1), NHWC, 1, 1)


def test_one_by_one_conv_layer_matches_flax_conv():
  x = _normal(2, (3, 7, 4, 16))
  ours = layers.conv(24, (1, 1), padding="VALID", dtype=jnp.float32, param_dtype=jnp.float32)
  ref = nn.Conv(24, (1, 1), padding="VALID")
  params = nn.unbox(ours.init(jax.random.key(0), x))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref.init(jax.random.key(0), x))
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)


def _resize_then_conv(x, kernel, bias):
  b, h, w, c = x.shape
  up = jax.image.resize(x, (b, 2 * h, 2 * w, c), "nearest")
  return lax.conv_general_dilated(up, kernel, (1, 1), ((1, 1), (1, 1)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias


@pytest.mark.parametrize("shape,features", [((2, 4, 4, 8), 8), ((1, 3, 5, 6), 4), ((2, 1, 1, 4), 3)])
def test_nearest_upsample_conv_equals_resize_then_conv(shape, features):
  x = _normal(3, shape)
  module = NearestUpsampleConv(features)
  params = nn.unbox(module.init(jax.random.key(1), x))["params"]
  params = {"kernel": _normal(4, params["kernel"].shape), "bias": _normal(5, (features,))}
  y = module.apply({"params": params}, x)
  assert y.shape == (shape[0], 2 * shape[1], 2 * shape[2], features)
  np.testing.assert_allclose(y, _resize_then_conv(x, params["kernel"], params["bias"]),
                             rtol=1e-5, atol=1e-5)
  cot = _normal(6, y.shape)
  ours = jax.grad(lambda p, x: jnp.sum(module.apply({"params": p}, x) * cot), argnums=(0, 1))
  ref = jax.grad(lambda p, x: jnp.sum(_resize_then_conv(x, p["kernel"], p["bias"]) * cot),
                 argnums=(0, 1))
  for a, b in zip(jax.tree.leaves(ours(params, x)), jax.tree.leaves(ref(params, x))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_upsample_block_keeps_the_conv_params_and_their_init():
  x = _normal(7, (1, 4, 4, 8))
  block = Upsample2D(16)
  params = nn.unbox(block.init(jax.random.key(0), x))["params"]
  plain = nn.Conv(16, (3, 3), padding=((1, 1), (1, 1)), name="conv")
  # the same path, names, shapes and initializers as the former resize + layers.conv
  expected = nn.Sequential([plain]).init(jax.random.key(0), jnp.zeros((1, 8, 8, 8)))["params"]
  assert jax.tree.map(jnp.shape, params) == {"conv": jax.tree.map(jnp.shape, expected["layers_0"])}
  np.testing.assert_allclose(params["conv"]["kernel"].std(), expected["layers_0"]["kernel"].std(),
                             rtol=0.3)
  boxed = block.init(jax.random.key(0), x)
  axes = nn.get_partition_spec(boxed)["params"]["conv"]
  assert tuple(axes["kernel"]) == (None, None, "conv_in", "conv_out")
  assert tuple(axes["bias"]) == ("conv_out",)


def test_nearest_upsample_conv_bfloat16():
  x = _normal(8, (1, 4, 4, 8))
  module = NearestUpsampleConv(8, dtype=jnp.bfloat16)
  params = nn.unbox(module.init(jax.random.key(1), x))["params"]
  assert params["kernel"].dtype == jnp.float32
  y = module.apply({"params": params}, x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(y.astype(jnp.float32),
                             _resize_then_conv(x, params["kernel"], params["bias"]),
                             rtol=5e-2, atol=5e-2)


def _kernel_grad_contractions(f, x, w):
  """The number of contracted axes of each dot_general in the jaxpr of f's gradient."""
  jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1)))(x, w)
  return [len(e.params["dimension_numbers"][0][0]) for e in jaxpr.jaxpr.eqns
          if e.primitive.name == "dot_general"]


@pytest.mark.parametrize("shape", [(7, 8), (2, 5, 8), (2, 3, 4, 8), (8,)])
def test_matmul_last_axis_matches_dot_and_contracts_one_axis(shape):
  x, w = _normal(0, shape), _normal(1, (8, 6))
  ref = lambda x, w: lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
  ours = lambda x, w: layers.matmul_last_axis(x, w)
  assert ours(x, w).shape == shape[:-1] + (6,)
  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
  loss = lambda f: jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1))
  for a, b in zip(loss(ours)(x, w), loss(ref)(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # Every product of the gradient contracts one axis; the plain form's kernel gradient contracts
  # all leading axes of x (what made XLA:CPU transpose the output gradient).
  assert set(_kernel_grad_contractions(ours, x, w)) == {1}
  if len(shape) > 2:
    assert len(shape) - 1 in _kernel_grad_contractions(ref, x, w)


def test_dense_layers_use_it_and_keep_flax_params():
  x = _normal(0, (2, 5, 8))
  ours = layers.dense(6, ("embed", "mlp"), dtype=jnp.float32, param_dtype=jnp.float32)
  plain = nn.Dense(6)
  variables = nn.meta.unbox(ours.init(jax.random.key(0), x))
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, plain.init(jax.random.key(0), x))
  np.testing.assert_allclose(ours.apply(variables, x), plain.apply(variables, x), rtol=1e-5, atol=1e-5)
  f = lambda x, k: ours.apply({"params": {"kernel": k, "bias": variables["params"]["bias"]}}, x)
  assert set(_kernel_grad_contractions(f, x, variables["params"]["kernel"])) == {1}
  # Other contractions pass through to lax.dot_general unchanged.
  a, b = _normal(2, (3, 4, 5)), _normal(3, (3, 5, 2))
  dims = (((2,), (1,)), ((0,), (0,)))
  np.testing.assert_allclose(layers.dense_dot_general(a, b, dims), lax.dot_general(a, b, dims),
                             rtol=1e-6)
