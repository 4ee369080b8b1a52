"""The diffusion train step: sharded equals unsharded, sharding follows the rules, it learns,
EMA math, compiles once, and checkpoint-resume is bit-exact."""

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from latent_diffusion_jax.core import parallel
from latent_diffusion_jax.diffusion import schedules
from latent_diffusion_jax.models.autoencoder import AutoencoderKL
from latent_diffusion_jax.models.text_encoders import LDMTextTransformer
from latent_diffusion_jax.models.unet import UNet2DConditionModel
from latent_diffusion_jax.training import startup
from latent_diffusion_jax.checkpoints.checkpointer import Checkpointer
from latent_diffusion_jax.models.conditioners.text import text_conditioner
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
  conditioner = text_conditioner("ldm_transformer", text, True, 16, empty_ids=(0,) * L)
  task = DiffusionTask(unet=unet, vae=vae, conditioner=conditioner,
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
  frozen = {"vae": vae_params, "null_inputs": {"input_ids": np.zeros((L,), np.int32)}}
  return init_fn, step, batch, frozen


def _mesh(shape):
  return parallel.create_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])


_COMPILED = {}


def _compiled(setup_parts, mesh_shape):
  """One jitted step per mesh shape, shared by the tests; counts its traces."""
  if mesh_shape not in _COMPILED:
    init_fn, step, batch, frozen = setup_parts
    mesh = _mesh(mesh_shape)
    traces = []

    def counted(*args):
      traces.append(1)
      return step(*args)

    with parallel.mesh_context(mesh, RULES):
      _, shardings = parallel.sharded_abstract_state(init_fn, jax.random.key(0), mesh=mesh, rules=RULES)
      g_batch = parallel.global_batch(batch, mesh)
      extra = (startup.put_replicated(frozen, mesh), startup.device_scalar(0.5, mesh))
      fn = jax.jit(counted, in_shardings=(shardings, jax.tree.map(lambda x: x.sharding, g_batch),
                                          jax.tree.map(lambda x: x.sharding, extra[0]), extra[1].sharding),
                   out_shardings=(shardings, startup.replicated(mesh)), donate_argnums=(0,))
    _COMPILED[mesh_shape] = (mesh, fn, g_batch, extra, traces)
  return _COMPILED[mesh_shape]


_HOST_STATE = {}


def _host_state(setup_parts):
  """The initial state, computed once (random init is sharding-invariant)."""
  if "state" not in _HOST_STATE:
    _HOST_STATE["state"] = jax.device_get(parallel.unbox(jax.jit(setup_parts[0])(jax.random.key(0))))
  return _HOST_STATE["state"]


def _fresh_state(setup_parts, mesh):
  """The initial state placed with the shardings the rules give (what create_sharded_state makes)."""
  _, shardings = parallel.sharded_abstract_state(setup_parts[0], jax.random.key(0), mesh=mesh, rules=RULES)
  return jax.device_put(_host_state(setup_parts), shardings)


def _run(setup_parts, mesh_shape, steps=1):
  mesh, fn, g_batch, extra, _ = _compiled(setup_parts, mesh_shape)
  state = _fresh_state(setup_parts, mesh)
  losses, first = [], None
  with parallel.mesh_context(mesh, RULES):
    for _ in range(steps):
      state, metrics = fn(state, g_batch, *extra)
      losses.append(float(metrics["loss"]))
      if first is None:
        first = jax.device_get(state)
  return state, first, losses, jax.device_get(metrics)


@pytest.fixture(scope="module")
def reference(setup_parts):
  """30 steps on one device: the state after the first step, and all losses."""
  _, first, losses, _ = _run(setup_parts, (1, 1, 1), steps=30)
  return first, losses


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_step_equals_single_device(setup_parts, reference, mesh_shape):
  ref_state, ref_losses = reference
  state, _, losses, metrics = _run(setup_parts, mesh_shape)
  assert bool(metrics["finite"])
  np.testing.assert_allclose(losses, ref_losses[:1], rtol=1e-5)
  # Tolerance: different reduction orders across devices; updates are ~lr=3e-3 in size.
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(ref_state.params)):
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


def test_loss_goes_down_when_overfitting_one_batch(reference):
  _, losses = reference
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


def test_ema_math():
  assert float(ema_decay_at(0.999, jnp.array(0))) == pytest.approx(0.1)
  assert float(ema_decay_at(0.999, jnp.array(10**6))) == pytest.approx(0.999)
  from latent_diffusion_jax.training.state import ema_update
  out = ema_update({"w": jnp.array([1.0])}, {"w": jnp.array([3.0])}, jnp.array(0.75))
  assert float(out["w"][0]) == pytest.approx(0.75 * 1 + 0.25 * 3)


def test_ema_tracks_params_in_step(setup_parts, reference):
  ref_state, _ = reference
  p, e = ref_state.params, ref_state.ema_params
  # After one update from identical init, ema = d*init + (1-d)*new with d = min(.99, 1/10).
  init = _host_state(setup_parts).params
  leaf = lambda t: t["unet"]["conv_in"]["kernel"]
  np.testing.assert_allclose(leaf(e), 0.1 * leaf(init) + 0.9 * leaf(p), atol=1e-6)


def test_step_compiles_once(setup_parts, reference):
  """30 steps (and every other test on this mesh) traced the step once."""
  assert len(_compiled(setup_parts, (1, 1, 1))[4]) == 1


def test_grad_accumulation_matches_big_batch():
  """k micro-batches of B/k average to the same gradient as one batch of B (dropout off)."""
  # The diffusion loss draws its noise per micro-batch, so the helper is checked on a
  # deterministic loss.
  from latent_diffusion_jax.training.update import accumulate_gradients
  x = jnp.arange(8.0)
  grad_fn = jax.value_and_grad(lambda p, b, r: (jnp.mean((p * b["x"]) ** 2), {"n": b["x"]}), has_aux=True)
  (l1, _), g1 = accumulate_gradients(grad_fn, jnp.float32(2.0), {"x": x}, jax.random.key(0), 1)
  (l4, aux), g4 = accumulate_gradients(grad_fn, jnp.float32(2.0), {"x": x}, jax.random.key(0), 4)
  np.testing.assert_allclose(g1, g4, rtol=1e-6)
  np.testing.assert_allclose(l1, l4, rtol=1e-6)
  assert aux["n"].shape == (8,)


def test_resume_is_bit_exact(setup_parts, tmp_path):
  init_fn = setup_parts[0]
  mesh, fn, g_batch, extra, _ = _compiled(setup_parts, (2, 2, 2))
  k = 2
  state = _fresh_state(setup_parts, mesh)
  with parallel.mesh_context(mesh, RULES):
    for _ in range(2 * k):
      state, _ = fn(state, g_batch, *extra)
    straight = jax.device_get(state)

    state = _fresh_state(setup_parts, mesh)
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


def test_step_on_moments_and_ready_text_embeddings(setup_parts):
  """Pre-encoded latents ("moments") and ready text embeddings ("context") skip both encoders;
  caption dropout swaps in the stored empty-prompt embedding."""
  _, step, _, frozen = setup_parts
  rng = np.random.default_rng(1)
  batch = {"moments": rng.standard_normal((B, 4, 4, 8)).astype(np.float32),
           "context": rng.standard_normal((B, L, 16)).astype(np.float32)}
  frozen = dict(frozen, null_inputs=dict(frozen["null_inputs"], context=np.zeros((L, 16), np.float32)))
  state = _host_state(setup_parts)
  new_state, metrics = jax.jit(step)(state, batch, frozen, jnp.float32(0.5))
  assert bool(metrics["finite"]) and int(new_state.step) == 1
  # The text encoder is not used on this path, so it gets no update beyond weight decay (none on
  # its 1-d params).
  ln = lambda s: s.params["text_encoder"]["final_layer_norm"]["scale"]
  np.testing.assert_array_equal(ln(new_state), ln(state))
