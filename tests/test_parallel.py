"""Meshes, logical-rule shardings, sharded init and global batches on 8 fake CPU devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec as P

from latent_diffusion_jax.core import parallel
from latent_diffusion_jax.models import layers

F32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)


class TinyNet(nn.Module):
  """RGB conv (3 input channels), norm, conv, MLP and a 7-row embedding: every axis kind."""

  @nn.compact
  def __call__(self, images, labels):
    h = layers.conv(16, **F32, name="conv_rgb")(images)
    h = layers.group_norm(4, **F32, name="norm")(h)
    h = layers.constrain(nn.silu(h), ("batch", "height", "width", "act_embed"))
    h = layers.conv(32, **F32, name="conv_mid")(h)
    h = h.mean(axis=(1, 2)) + layers.embed(7, 32, **F32, name="label_embed")(labels)
    h = layers.dense(64, ("embed", "mlp"), **F32, name="fc1")(h)
    h = layers.constrain(nn.gelu(h), ("batch", "act_mlp"))
    return layers.dense(8, ("mlp", "embed"), **F32, name="fc2")(h)


def _dummy_inputs(batch=8):
  images = jnp.asarray(np.random.RandomState(0).randn(batch, 8, 8, 3), jnp.float32)
  labels = jnp.arange(batch) % 7
  return images, labels


def _init_params(rng):
  return TinyNet().init(rng, *_dummy_inputs(1))["params"]


def _full_spec(sharding, ndim):
  """PartitionSpec as a tuple of length ndim, so P() and P(None, None) compare equal."""
  spec = tuple(sharding.spec)
  return spec + (None,) * (ndim - len(spec))


@pytest.mark.parametrize("shape, expected", [
    ((8,), {"data": 8, "fsdp": 1, "tensor": 1}),
    ((-1,), {"data": 8, "fsdp": 1, "tensor": 1}),
    ((2, 4), {"data": 2, "fsdp": 4, "tensor": 1}),
    ((2, -1), {"data": 2, "fsdp": 4, "tensor": 1}),
    ((2, 2, 2), {"data": 2, "fsdp": 2, "tensor": 2}),
    ((-1, 2, 2), {"data": 2, "fsdp": 2, "tensor": 2}),
    ({"fsdp": 4, "data": -1}, {"data": 2, "fsdp": 4, "tensor": 1}),
    ({"tensor": 8}, {"data": 1, "fsdp": 1, "tensor": 8}),
])
def test_create_mesh_shapes(shape, expected):
  mesh = parallel.create_mesh(shape)
  assert dict(mesh.shape) == expected
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.parametrize("shape, words", [
    ((3, 2), ["'data': 3", "'fsdp': 2", "(6)", "device count 8", "alternatives"]),
    ((3, -1), ["'data': 3", "does not divide", "device count 8"]),
    ({"data": 16}, ["'data': 16", "device count 8"]),
])
def test_create_mesh_invalid_names_values(shape, words):
  with pytest.raises(ValueError) as err:
    parallel.create_mesh(shape)
  for word in words:
    assert word in str(err.value)


@pytest.mark.parametrize("shape", [(-1, -1), {"pipeline": 2}, (1, 1, 1, 8)])
def test_create_mesh_rejects_malformed(shape):
  with pytest.raises(ValueError):
    parallel.create_mesh(shape)


def test_create_mesh_on_given_devices():
  mesh = parallel.create_mesh((-1, 2), devices=jax.devices()[:4])
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 1}


# Expected mesh axes written out by hand from DEFAULT_LOGICAL_AXIS_RULES on fsdp=4, tensor=2.
EXPECTED_SPECS_F4_T2 = {
    ("conv_rgb", "kernel"): (None, None, None, "tensor"),  # 3 RGB channels: not split over fsdp=4
    ("conv_rgb", "bias"): ("tensor",),
    ("norm", "scale"): (None,),
    ("norm", "bias"): (None,),
    ("conv_mid", "kernel"): (None, None, "fsdp", "tensor"),
    ("conv_mid", "bias"): ("tensor",),
    ("label_embed", "embedding"): (None, "fsdp"),  # 7 rows: not split over tensor=2
    ("fc1", "kernel"): ("fsdp", "tensor"),
    ("fc1", "bias"): ("tensor",),
    ("fc2", "kernel"): ("tensor", "fsdp"),
    ("fc2", "bias"): ("fsdp",),
}


def _by_name(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(k.key for k in path): leaf for path, leaf in flat}


@pytest.fixture(scope="module")
def mesh_f4_t2():
  return parallel.create_mesh({"data": 1, "fsdp": 4, "tensor": 2})


def test_logical_to_sharding_follows_rules(mesh_f4_t2):
  abstract = jax.eval_shape(_init_params, jax.random.key(0))
  shardings = _by_name(parallel.logical_to_sharding(abstract, mesh_f4_t2))
  assert set(shardings) == set(EXPECTED_SPECS_F4_T2)
  for name, expected in EXPECTED_SPECS_F4_T2.items():
    assert _full_spec(shardings[name], len(expected)) == expected, name


def test_logical_to_sharding_partial_fallback_and_plain_leaves(mesh_f4_t2):
  tree = {
      # 6 rows do not split 8 ways over data*fsdp on a (2, 4) mesh, but do split over data alone.
      "two_axes": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((6, 8), jnp.float32),
                                          ("batch", "mlp")),
      # nn.with_partitioning boxes name mesh axes directly; the fallback applies to them too.
      "mesh_named": nn.Partitioned(jax.ShapeDtypeStruct((3, 8), jnp.float32), ("fsdp", "data")),
      "count": jax.ShapeDtypeStruct((), jnp.int32),
  }
  mesh = parallel.create_mesh((2, 4))
  out = parallel.logical_to_sharding(tree, mesh)
  assert _full_spec(out["two_axes"], 2) == ("data", "tensor")
  assert _full_spec(out["mesh_named"], 2) == (None, "data")
  assert out["count"].spec == P()
  out = parallel.logical_to_sharding(tree, mesh_f4_t2)
  assert _full_spec(out["two_axes"], 2) == ("data", "tensor")  # data*fsdp = 4 does not divide 6


@pytest.fixture(scope="module")
def sharded_train_state(mesh_f4_t2):
  def init(rng):
    return train_state.TrainState.create(
        apply_fn=TinyNet().apply, params=_init_params(rng), tx=optax.adam(1e-3))
  state, shardings = parallel.create_sharded_state(init, jax.random.key(0), mesh=mesh_f4_t2)
  return state, shardings


def test_create_sharded_state_actual_shardings(sharded_train_state, mesh_f4_t2):
  state, shardings = sharded_train_state
  params = _by_name(state.params)
  for tree in (state.params, state.opt_state[0].mu, state.opt_state[0].nu):
    for name, leaf in _by_name(tree).items():
      expected = EXPECTED_SPECS_F4_T2[name]
      assert isinstance(leaf, jax.Array), name
      assert leaf.sharding.mesh == mesh_f4_t2
      assert _full_spec(leaf.sharding, leaf.ndim) == expected, name
  kernel = params[("conv_rgb", "kernel")]
  assert kernel.addressable_shards[0].data.shape == (3, 3, 3, 8)  # channels in whole, out halved
  assert state.step.sharding.is_fully_replicated
  assert state.opt_state[0].count.sharding.is_fully_replicated
  # The shardings tree matches the (unboxed) state leaf for leaf.
  assert jax.tree.structure(shardings) == jax.tree.structure(state)
  jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(str(s)),
               state, shardings)


def test_batch_sharding_and_global_batch():
  mesh = parallel.create_mesh((2, 2, 2))
  assert parallel.batch_sharding(mesh, 3).spec == P(("data", "fsdp"), None, None)
  local = {"images": np.arange(8 * 4 * 4 * 3, dtype=np.float32).reshape(8, 4, 4, 3),
           "labels": np.arange(8, dtype=np.int32)}
  batch = parallel.global_batch(local, mesh)
  assert batch["images"].shape == (8, 4, 4, 3)
  assert batch["labels"].shape == (8,)
  assert batch["images"].sharding == parallel.batch_sharding(mesh, 4)
  assert batch["images"].addressable_shards[0].data.shape == (2, 4, 4, 3)
  np.testing.assert_array_equal(np.asarray(batch["images"]), local["images"])
  with pytest.raises(ValueError) as err:
    parallel.global_batch({"x": np.zeros((6, 2))}, mesh)
  assert "global batch size 6" in str(err.value) and "2*2 = 4" in str(err.value)


def test_sharded_step_matches_unsharded(sharded_train_state, mesh_f4_t2):
  state, shardings = sharded_train_state
  images, labels = _dummy_inputs(8)

  def loss_fn(params, images, labels):
    out = TinyNet().apply({"params": params}, images, labels)
    return jnp.mean((out - 1.0) ** 2)

  def step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, *batch)
    return state.apply_gradients(grads=grads), loss

  batch = parallel.global_batch((np.asarray(images), np.asarray(labels)), mesh_f4_t2)
  batch_shardings = jax.tree.map(lambda x: x.sharding, batch)
  replicated = NamedSharding(mesh_f4_t2, P())
  with parallel.mesh_context(mesh_f4_t2):
    sharded = jax.jit(step, in_shardings=(shardings, batch_shardings),
                      out_shardings=(shardings, replicated))
    new_state, loss = sharded(state, batch)
  host_state = jax.device_get(state)
  ref_state, ref_loss = jax.jit(step)(host_state, (images, labels))
  # Sharded reductions sum in another order than one device: float32 rounding, ~1e-6 here.
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                       atol=1e-5),
               new_state.params, ref_state.params)
  assert _full_spec(new_state.params["fc1"]["kernel"].sharding, 2) == ("fsdp", "tensor")


def test_mesh_context_applies_rules():
  mesh = parallel.create_mesh((2, 2, 2))
  with parallel.mesh_context(mesh):
    out = jax.jit(lambda x: layers.constrain(x * 2, ("batch", "act_mlp")))(jnp.ones((8, 4)))
    # A parameter name on an activation must not steal fsdp from the batch.
    misnamed = jax.jit(lambda x: layers.constrain(x * 2, ("batch", "embed")))(jnp.ones((8, 4)))
  assert _full_spec(out.sharding, 2) == (("data", "fsdp"), "tensor")
  assert _full_spec(misnamed.sharding, 2) == (("data", "fsdp"), None)


def test_initialize_distributed_single_process_is_noop():
  parallel.initialize_distributed()
  parallel.initialize_distributed(num_processes=1)
  assert jax.process_count() == 1
  assert jax.device_count() == 8
