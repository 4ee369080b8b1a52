"""The diffusion train step: sharded equals unsharded, sharding follows the rules, it learns,
EMA math, compiles once, and checkpoint-resume is bit-exact."""

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from latent_diffusion_jax import parallel
from latent_diffusion_jax.diffusion import schedules
from latent_diffusion_jax.models.autoencoder import AutoencoderKL
from latent_diffusion_jax.models.text_encoders import LDMTextTransformer
from latent_diffusion_jax.models.unet import UNet2DConditionModel
from latent_diffusion_jax.training import setup
from latent_diffusion_jax.training.checkpointing import Checkpointer
from latent_diffusion_jax.training.diffusion_step import (DiffusionTask, init_train_state,
                                                          make_train_step)
from latent_diffusion_jax.training.state import ema_decay_at, learning_rate_schedule, make_optimizer

RULES = parallel.DEFAULT_LOGICAL_AXIS_RULES
B, L = 8, 6


def _opt_cfg(**kw):
  cfg = dict(learning_rate=3e-3, warmup_steps=1, schedule="constant", end_learning_rate_factor=0.0,
             b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, grad_clip_norm=1.0, grad_accum_steps=1,
             ema_decay=0.99)
  cfg.update(kw)
  return mc.ConfigDict(cfg)


@pytest.fixture(scope="module")
def setup_parts():
  unet = UNet2DConditionModel(block_out_channels=(16, 32), attention_levels=(True, False),
                              layers_per_block=1, num_heads=2, cross_attention_dim=16,
                              norm_num_groups=4)
  vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                      norm_num_groups=4)
  text = LDMTextTransformer(vocab_size=32, max_length=L, width=16, depth=1, heads=2)
  vae_params = jax.jit(vae.init)(jax.random.key(1), jnp.zeros((1, 8, 8, 3)))["params"]
  task = DiffusionTask(unet=unet, vae=vae, text_encoder=text, text_trainable=True,
                       schedule=schedules.make_schedule("scaled_linear"), prediction_type="epsilon",
                       caption_dropout=0.2, num_buckets=4)
  opt = _opt_cfg()
  tx = make_optimizer(opt, 100)

  def init_fn(rng):
    r1, r2 = jax.random.split(rng)
    params = {"unet": unet.init(r1, jnp.zeros((1, 4, 4, 4)), jnp.zeros((1,), jnp.int32),
                                jnp.zeros((1, L, 16)))["params"],
              "text_encoder": text.init(r2, jnp.zeros((1, L), jnp.int32))["params"]}
    return init_train_state(params, tx, 0, ema=True)

  step = make_train_step(task, tx, learning_rate_schedule(opt, 100), ema_decay=opt.ema_decay)
  rng = np.random.default_rng(0)
  batch = {"images": rng.integers(0, 256, (B, 8, 8, 3), dtype=np.uint8),
           "input_ids": rng.integers(0, 32, (B, L)).astype(np.int32)}
  frozen = {"vae": vae_params, "uncond_ids": np.zeros((L,), np.int32)}
  return init_fn, step, batch, frozen


def _mesh(shape):
  return parallel.create_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])


def _run(setup_parts, mesh_shape, steps=1):
  init_fn, step, batch, frozen = setup_parts
  mesh = _mesh(mesh_shape)
  with parallel.mesh_context(mesh, RULES):
    state, shardings = parallel.create_sharded_state(init_fn, jax.random.key(0), mesh=mesh, rules=RULES)
    g_batch = parallel.global_batch(batch, mesh)
    extra = (setup.put_replicated(frozen, mesh), setup.device_scalar(0.5, mesh))
    fn = setup.compile_step(step, state, shardings, g_batch, extra, mesh)
    losses = []
    for _ in range(steps):
      state, metrics = fn(state, g_batch, *extra)
      losses.append(float(metrics["loss"]))
  return state, shardings, losses, jax.device_get(metrics)


@pytest.fixture(scope="module")
def reference(setup_parts):
  return _run(setup_parts, (1, 1, 1), steps=1)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_step_equals_single_device(setup_parts, reference, mesh_shape):
  ref_state, _, ref_losses, _ = reference
  state, shardings, losses, metrics = _run(setup_parts, mesh_shape)
  assert bool(metrics["finite"])
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  # Tolerance: different reduction orders across devices; updates are ~lr=3e-3 in size.
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(jax.device_get(ref_state.params))):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
  # Parameters are really split as the rules say: a kernel with an "embed" input side over fsdp and
  # an "mlp"/"heads" output side over tensor.
  ff = state.params["unet"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["ff"]["net_0"]["proj"]["kernel"]
  assert ff.sharding.spec == P("fsdp", "tensor")
  shard = ff.addressable_shards[0].data.shape
  assert shard == (ff.shape[0] // mesh_shape[1], ff.shape[1] // mesh_shape[2])
  # Optimizer moments follow their params.
  mu = state.opt_state[1][0].mu["unet"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["ff"]["net_0"]["proj"]["kernel"]
  assert mu.sharding.spec == ff.sharding.spec


def test_loss_goes_down_when_overfitting_one_batch(setup_parts):
  _, _, losses, _ = _run(setup_parts, (1, 1, 1), steps=30)
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


def test_ema_math():
  assert float(ema_decay_at(0.999, jnp.array(0))) == pytest.approx(0.1)
  assert float(ema_decay_at(0.999, jnp.array(10**6))) == pytest.approx(0.999)
  from latent_diffusion_jax.training.state import ema_update
  out = ema_update({"w": jnp.array([1.0])}, {"w": jnp.array([3.0])}, jnp.array(0.75))
  assert float(out["w"][0]) == pytest.approx(0.75 * 1 + 0.25 * 3)


def test_ema_tracks_params_in_step(setup_parts, reference):
  ref_state, *_ = reference
  p = jax.device_get(ref_state.params)
  e = jax.device_get(ref_state.ema_params)
  # After one update from identical init, ema = d*init + (1-d)*new with d = min(.99, 1/10).
  init_fn = setup_parts[0]
  init = jax.device_get(parallel.unbox(jax.jit(init_fn)(jax.random.key(0)).params))
  leaf = lambda t: t["unet"]["conv_in"]["kernel"]
  np.testing.assert_allclose(leaf(e), 0.1 * leaf(init) + 0.9 * leaf(p), atol=1e-6)


def test_step_compiles_once(setup_parts):
  init_fn, step, batch, frozen = setup_parts
  traces = []

  def counted(*a):
    traces.append(1)
    return step(*a)

  mesh = _mesh((1, 1, 1))
  state, shardings = parallel.create_sharded_state(init_fn, jax.random.key(0), mesh=mesh, rules=RULES)
  fn = jax.jit(counted, donate_argnums=(0,))
  for _ in range(3):
    state, _ = fn(state, batch, frozen, jnp.float32(0.5))
  assert len(traces) == 1


def test_grad_accumulation_matches_big_batch(setup_parts):
  """k micro-batches of B/k average to the same gradient as one batch of B (dropout off)."""
  import dataclasses
  init_fn, _, batch, frozen = setup_parts
  task = None
  from latent_diffusion_jax.training import diffusion_step
  state = parallel.unbox(jax.jit(init_fn)(jax.random.key(0)))
  # The loss draws per-example noise from one rng per micro-batch, so compare the gradient of a
  # deterministic loss instead: the accumulation helper itself.
  from latent_diffusion_jax.training.update import accumulate_gradients
  x = jnp.arange(8.0)
  grad_fn = jax.value_and_grad(lambda p, b, r: (jnp.mean((p * b["x"]) ** 2), {"n": b["x"]}), has_aux=True)
  (l1, _), g1 = accumulate_gradients(grad_fn, jnp.float32(2.0), {"x": x}, jax.random.key(0), 1)
  (l4, aux), g4 = accumulate_gradients(grad_fn, jnp.float32(2.0), {"x": x}, jax.random.key(0), 4)
  np.testing.assert_allclose(g1, g4, rtol=1e-6)
  np.testing.assert_allclose(l1, l4, rtol=1e-6)
  assert aux["n"].shape == (8,)
  del dataclasses, task, diffusion_step, state


def test_resume_is_bit_exact(setup_parts, tmp_path):
  init_fn, step, batch, frozen = setup_parts
  mesh = _mesh((2, 2, 2))
  k = 2
  with parallel.mesh_context(mesh, RULES):
    state, shardings = parallel.create_sharded_state(init_fn, jax.random.key(0), mesh=mesh, rules=RULES)
    g_batch = parallel.global_batch(batch, mesh)
    extra = (setup.put_replicated(frozen, mesh), setup.device_scalar(0.5, mesh))
    fn = setup.compile_step(step, state, shardings, g_batch, extra, mesh)
    for _ in range(2 * k):
      state, _ = fn(state, g_batch, *extra)
    straight = jax.device_get(state)

    state, _ = parallel.create_sharded_state(init_fn, jax.random.key(0), mesh=mesh, rules=RULES)
    ckpt = Checkpointer(tmp_path, save_interval_steps=1, async_save=True)
    for _ in range(k):
      state, _ = fn(state, g_batch, *extra)
    ckpt.save(k, state, data={"position": k}, force=True)
    ckpt.wait_until_finished()
    abstract, _ = parallel.sharded_abstract_state(init_fn, jax.random.key(0), mesh=mesh, rules=RULES)
    restored, data, _ = ckpt.restore(abstract_state=abstract)
    assert data == {"position": k} and int(restored.step) == k
    for _ in range(k):
      restored, _ = fn(restored, g_batch, *extra)
    ckpt.close()
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(jax.device_get(restored))):
    np.testing.assert_array_equal(a, b)
