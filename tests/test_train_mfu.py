"""The trainer's compute rate: each stage's real step, compiled as the driver compiles it, run by
the host loop, logs `tflop_per_sec_per_device` and `mfu` beside img/s, to the log line and to
TensorBoard."""

import functools
import logging as py_logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from latent_diffusion_jax.checkpoints.checkpointer import Checkpointer
from latent_diffusion_jax.core import flops as flops_lib
from latent_diffusion_jax.core import parallel
from latent_diffusion_jax.diffusion import schedules
from latent_diffusion_jax.models.unet import UNet2DConditionModel
from latent_diffusion_jax.sweeps.summary import read_scalars
from latent_diffusion_jax.training import loop, startup
from latent_diffusion_jax.training.diffusion_step import (DiffusionTask, init_train_state,
                                                          make_train_step)

RULES = parallel.DEFAULT_LOGICAL_AXIS_RULES
B = 4


def _mesh():
  return parallel.create_mesh((1, 1, 1), devices=jax.devices()[:1])


@functools.lru_cache(maxsize=None)
def _diffusion_parts():
  """(compiled step, fresh-state fn, step args, batches) of a tiny UNet's diffusion step, built
  and compiled once for the module (the step donates its state: each run takes a fresh one)."""
  mesh = _mesh()
  unet = UNet2DConditionModel(block_out_channels=(8,), attention_levels=(True,), layers_per_block=1,
                              num_heads=1, cross_attention_dim=8, norm_num_groups=4,
                              mid_block_attention=False)
  task = DiffusionTask(unet=unet, vae=None, conditioner=None,
                       schedule=schedules.make_schedule("scaled_linear"),
                       prediction_type="epsilon", num_buckets=2)
  tx = optax.adam(1e-3)
  params = unet.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32),
                     jnp.zeros((1, 1, 8)))["params"]
  # New buffers on every call (jit outputs): the step donates the state it is given.
  init = jax.jit(lambda p: init_train_state({"unet": p}, tx, 0, ema=True),
                 out_shardings=startup.replicated(mesh))
  fresh = lambda: init(parallel.unbox(params))  # noqa: E731
  state = fresh()
  shardings = jax.tree.map(lambda x: x.sharding, state)
  rng = np.random.default_rng(0)
  batches = [parallel.global_batch({"moments": rng.standard_normal((B, 8, 8, 8)).astype(np.float32)},
                                   mesh) for _ in range(3)]
  args = ({"vae": {}}, startup.device_scalar(0.5, mesh))
  step = startup.compile_step(make_train_step(task, tx, lambda s: 1e-3, ema_decay=0.9), state,
                              shardings, batches[0], args, mesh)
  return step, fresh, args, batches


def _diffusion_step(mesh=None):
  """(compiled step, state, step args, batches) of the tiny UNet's diffusion step."""
  step, fresh, args, batches = _diffusion_parts()
  return step, fresh(), args, batches


def _autoencoder_step(mesh):
  """The same for the first stage (KL autoencoder, discriminator, LPIPS-free tiny config)."""
  from test_autoencoder_trainer import _filled_state, _tiny_config
  from latent_diffusion_jax.models import build
  from latent_diffusion_jax.training.autoencoder_step import make_train_step as make_ae_step
  from latent_diffusion_jax.training.stages import autoencoder as T
  config = _tiny_config(**{"autoencoder.disc_start": 1})
  vae = build.build_first_stage(config)
  task = T.build_task(config, vae)
  tx, lr = T.build_optimizer(config, task)
  with parallel.mesh_context(mesh, RULES):
    abstract, shardings = parallel.sharded_abstract_state(
        T.build_init_fn(config, vae), jax.random.key(0), mesh=mesh, rules=RULES)
    state = _filled_state(abstract)
    rng = np.random.default_rng(0)
    batches = [parallel.global_batch(
        {"images": rng.integers(0, 256, (B, 16, 16, 3), dtype=np.uint8)}, mesh) for _ in range(3)]
    step = startup.compile_step(make_ae_step(task, tx, lr, ema_decay=config.optimizer.ema_decay),
                                state, shardings, batches[0], (), mesh)
  return step, state, (), batches


def _run(tmp_path, built, peak: float):
  step, state, args, batches = built
  workdir = str(tmp_path)
  ckpt = Checkpointer(workdir + "/ckpt", save_interval_steps=100, async_save=False)
  result = loop.run(
      cfg=loop.LoopConfig(num_steps=len(batches), log_every=1, checkpoint_every=100,
                          global_batch=B, peak_flops_per_device=peak),
      state=state, step_fn=step, step_args=args, batches=iter(batches), checkpointer=ckpt,
      data_state=lambda: {}, meta=lambda: {}, writer=loop.create_writer(workdir))
  ckpt.close()
  return result, read_scalars(workdir)


@pytest.mark.parametrize("stage", ["diffusion", "autoencoder"])
def test_each_stage_logs_tflops_and_mfu(stage, tmp_path, caplog):
  mesh = _mesh()
  built = (_diffusion_step if stage == "diffusion" else _autoencoder_step)(mesh)
  step = built[0]
  assert step.last_flops is not None and step.last_flops > 0  # XLA's count of the compiled step
  caplog.set_level(py_logging.INFO)
  peak = 3.0e12
  result, tensorboard = _run(tmp_path, built, peak)
  last = result["last_metrics"]
  assert last["tflop_per_sec_per_device"] > 0 and last["images_per_sec"] > 0
  # The configured peak is the denominator, nothing is measured.
  assert last["mfu"] == pytest.approx(last["tflop_per_sec_per_device"] * 1e12 / peak)
  # The rate is XLA's FLOPs over the same wall time img/s uses.
  assert last["tflop_per_sec_per_device"] * 1e12 / step.last_flops == pytest.approx(
      last["images_per_sec"] / B, rel=1e-6)
  for key in ("mfu", "tflop_per_sec_per_device"):
    assert tensorboard[key][0] == 3 and tensorboard[key][1] > 0, key
  lines = [r.getMessage() for r in caplog.records if "images_per_sec" in r.getMessage()]
  assert len(lines) == 3 and all("mfu=" in x and "tflop_per_sec_per_device=" in x for x in lines)


def test_measured_peak_is_cached_and_used(tmp_path, monkeypatch):
  calls = []
  measure = flops_lib.measure_matmul_peak

  def counted(**kw):
    calls.append(kw)
    return measure(**kw)

  monkeypatch.setattr(flops_lib, "measure_matmul_peak", counted)
  monkeypatch.setattr(flops_lib, "_PEAKS", {})
  built = _diffusion_step(_mesh())
  result, _ = _run(tmp_path / "a", built, peak=0.0)
  peak = flops_lib.cached_matmul_peak(jnp.float32)
  assert len(calls) == 1 and calls[0]["size"] == 1024 and peak > 0
  last = result["last_metrics"]
  assert 0 < last["mfu"] == pytest.approx(last["tflop_per_sec_per_device"] * 1e12 / peak)
  _run(tmp_path / "b", _diffusion_step(_mesh()), peak=0.0)
  assert len(calls) == 1  # one measurement per device kind and dtype in a process


def test_grad_accumulation_scales_the_count_and_plain_steps_log_none(tmp_path):
  step, state, args, batches = _diffusion_step(_mesh())
  cfg = loop.LoopConfig(num_steps=1, log_every=1, checkpoint_every=1, global_batch=B,
                        grad_accum_steps=4)
  assert loop._flops_of_call(cfg, step) == 4 * step.last_flops
  # A step without a FLOP count (a bare function) logs no rate rather than a wrong one.
  bare = lambda s, b, *a: step(s, b, *a)  # noqa: E731
  ckpt = Checkpointer(str(tmp_path / "ckpt"), save_interval_steps=100, async_save=False)
  result = loop.run(cfg=loop.LoopConfig(num_steps=1, log_every=1, checkpoint_every=100,
                                        global_batch=B),
                    state=state, step_fn=bare, step_args=args, batches=iter(batches),
                    checkpointer=ckpt, data_state=lambda: {}, meta=lambda: {},
                    writer=loop.create_writer(str(tmp_path)))
  ckpt.close()
  assert "mfu" not in result["last_metrics"] and "images_per_sec" in result["last_metrics"]
