"""Faults that must lose nothing: SIGTERM and SIGKILLs of train.py (bench/chaos.py), non-finite
steps, damaged checkpoints, unwritable or full disks, and float16 (refused).

The in-process tests drive the real loop, Checkpointer and diffusion train step with a UNet of a
few thousand parameters; the subprocess tests run train.py on the small :tiny variant of
bench/chaos.py and compare with one uninterrupted run shared with tests/test_multihost.py.
"""

import concurrent.futures
import errno
import glob
import os
import shutil
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from clu import metric_writers

from latent_diffusion_jax.core.errors import StorageError
from latent_diffusion_jax.core import parallel
from latent_diffusion_jax.core.config import base_config
from latent_diffusion_jax.core.errors import StorageError
from latent_diffusion_jax.diffusion import schedules
from latent_diffusion_jax.models.unet import UNet2DConditionModel
from latent_diffusion_jax.checkpoints import resume as resume_lib
from latent_diffusion_jax.training import loop
from latent_diffusion_jax.checkpoints.checkpointer import (Checkpointer, CheckpointRestoreError,
                                                         CheckpointWriteError)
from latent_diffusion_jax.training.diffusion_step import (DiffusionTask, init_train_state,
                                                          make_train_step)
from latent_diffusion_jax.training.run import check_workdir, run_training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import chaos  # noqa: E402

STEPS = 6  # the shared reference run's length (tests/test_multihost.py)
B = 4


# ---------------------------------------------------------------- in-process: loop + real step


@pytest.fixture(scope="module")
def tiny():
  """(fresh-state fn, jitted diffusion step, frozen args, good batches, a NaN-moments batch)."""
  unet = UNet2DConditionModel(block_out_channels=(8,), attention_levels=(False,), layers_per_block=1,
                              num_heads=1, cross_attention_dim=8, norm_num_groups=4,
                              mid_block_attention=False)
  task = DiffusionTask(unet=unet, vae=None, conditioner=None,
                       schedule=schedules.make_schedule("scaled_linear"),
                       prediction_type="epsilon", num_buckets=2)
  tx = optax.adam(1e-2)
  step = jax.jit(make_train_step(task, tx, lambda s: 1e-2, ema_decay=0.9))

  def fresh():
    params = unet.init(jax.random.key(0), jnp.zeros((1, 4, 4, 4)), jnp.zeros((1,), jnp.int32),
                       jnp.zeros((1, 1, 8)))["params"]
    return init_train_state({"unet": parallel.unbox(params)}, tx, 0, ema=True)

  init = jax.jit(fresh)
  rng = np.random.default_rng(0)
  good = [{"moments": rng.standard_normal((B, 4, 4, 8)).astype(np.float32)} for _ in range(4)]
  bad = {"moments": good[0]["moments"].copy()}
  bad["moments"][1, 2, 3, 0] = np.nan
  return init, step, ({"vae": {}}, jnp.float32(0.5)), good, bad


def _run_loop(tiny, workdir, batches, *, policy="halt", checkpoint_every=2, record=None):
  init, step, args, _, _ = tiny
  consumed = []

  def feed():
    for b in batches:
      consumed.append(1)
      yield b

  ckpt = Checkpointer(workdir, save_interval_steps=checkpoint_every, async_save=True)
  result = loop.run(
      cfg=loop.LoopConfig(num_steps=len(batches), log_every=1, checkpoint_every=checkpoint_every,
                          global_batch=B, nonfinite_policy=policy),
      state=init(), step_fn=step, step_args=args, batches=feed(), checkpointer=ckpt,
      data_state=lambda: {"position": len(consumed) * B}, meta=lambda: {"latent_scale_factor": 0.5},
      writer=metric_writers.LoggingWriter(),
      hooks=[lambda s, st: record.append(jax.device_get(st))] if record is not None else None)
  ckpt.close()
  return result


def _in_thread(fn, timeout=120):
  """Runs fn in a thread; fails if it has not returned within `timeout` (a hang)."""
  out = {}

  def target():
    try:
      out["value"] = fn()
    except BaseException as e:  # handed to the test
      out["error"] = e

  t = threading.Thread(target=target, daemon=True)
  t.start()
  t.join(timeout)
  assert not t.is_alive(), f"still running after {timeout}s: it hangs"
  return out


def test_nonfinite_skip_keeps_state_and_counts(tiny, tmp_path):
  _, _, _, good, bad = tiny
  states = []
  result = _run_loop(tiny, tmp_path, [good[0], good[1], bad, good[2]], policy="skip", record=states)
  assert result["step"] == 4
  assert [int(s.nonfinite_skips) for s in states] == [0, 0, 1, 1]
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  # The NaN step left params, optimizer state and EMA exactly as they were; the next one moved on.
  assert same(states[2].params, states[1].params) and same(states[2].opt_state, states[1].opt_state)
  assert same(states[2].ema_params, states[1].ema_params)
  assert not same(states[3].params, states[2].params)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(states[3].params))


def test_nonfinite_halt_names_the_step_and_keeps_last_good_checkpoint(tiny, tmp_path):
  _, _, _, good, bad = tiny
  with pytest.raises(loop.NonFiniteLossError, match=r"at step 3 .*checkpoint is kept: step 2"):
    _run_loop(tiny, tmp_path, [good[0], good[1], bad, good[2]], policy="halt")
  ckpt = Checkpointer(tmp_path, read_only=True)
  assert ckpt.all_steps() == [2]
  state, data, _ = ckpt.restore(2, abstract_state=tiny[0]())
  assert data == {"position": 2 * B} and all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def _damage(step_dir, how):
  if how == "truncate":  # every array data file cut to half its length
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
             if os.path.isfile(f)]
    assert files
    for f in files:
      os.truncate(f, os.path.getsize(f) // 2)
  else:
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_damaged_checkpoint_is_named_and_fallback_resumes_previous(tiny, tmp_path, how, caplog):
  good = tiny[3]
  _run_loop(tiny, tmp_path, good, checkpoint_every=2)
  step_dir = os.path.join(tmp_path, "checkpoints", "4")
  _damage(step_dir, how)
  target = tiny[0]()
  ckpt = Checkpointer(tmp_path)
  with pytest.raises(CheckpointRestoreError, match=f"step 4 in {step_dir}.*restore_fallback"):
    resume_lib.resume(ckpt, target, fallback=False)
  assert ckpt.all_steps() == [2, 4]  # nothing renamed without the option
  state, data, _ = resume_lib.resume(ckpt, target, fallback=True)
  assert int(state.step) == 2 and data == {"position": 2 * B}
  assert "step 4" in caplog.text and "restore_fallback" in caplog.text
  # Moved aside, so this run can write step 4 again.
  assert ckpt.all_steps() == [2] and glob.glob(os.path.join(tmp_path, "checkpoints", "4.corrupt-*"))
  assert ckpt.save(4, state, data={"position": 4 * B}, force=True)
  ckpt.close()


def test_partly_deleted_older_step_does_not_block_resuming(tiny, tmp_path):
  """A kill during Orbax's max_to_keep deletion leaves an old step with some files removed."""
  _run_loop(tiny, tmp_path, tiny[3], checkpoint_every=1)
  old = os.path.join(tmp_path, "checkpoints", "2")
  for f in glob.glob(old + "/**", recursive=True):
    if os.path.isfile(f) and ("METADATA" in f or "/d/" in f or "manifest" in f):
      os.remove(f)
  ckpt = Checkpointer(tmp_path, max_to_keep=2)
  state, data, _ = resume_lib.resume(ckpt, tiny[0](), fallback=False)
  assert int(state.step) == 4 and data == {"position": 4 * B}
  assert ckpt.save(5, state, data=data, meta={}, force=True)
  ckpt.close()
  assert ckpt.all_steps() == [4, 5]  # and the remains were deleted in turn


def test_disk_full_in_the_foreground_stops_with_workdir_and_step(tiny, tmp_path, monkeypatch):
  def full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(ocp.CheckpointManager, "save", full)
  out = _in_thread(lambda: _run_loop(tiny, tmp_path, tiny[3], checkpoint_every=2))
  error = out.get("error")
  assert isinstance(error, CheckpointWriteError), out
  assert f"step 2 to {tmp_path}/checkpoints" in str(error) and "No space left" in str(error)


def test_disk_full_in_the_background_stops_with_workdir_and_step(tiny, tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity

  async def full(*a, **k):  # the final rename of an async save, in Orbax's background thread
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", full)
  out = _in_thread(lambda: _run_loop(tiny, tmp_path, tiny[3], checkpoint_every=2))
  error = out.get("error")
  assert isinstance(error, CheckpointWriteError), out
  assert f"step 2 to {tmp_path}/checkpoints" in str(error) and "No space left" in str(error)
  assert Checkpointer(tmp_path, read_only=True).all_steps() == []  # nothing half-written listed


def test_unwritable_workdir_fails_at_start_with_its_name(tmp_path):
  # Tests run as root, which ignores permission bits; a path below a regular file is unwritable
  # for everyone (ENOTDIR).
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  workdir = str(blocker / "run")
  with pytest.raises(StorageError, match=workdir):
    check_workdir(workdir)
  config = base_config()
  config.distributed.num_processes = 1
  with pytest.raises(StorageError, match=workdir):
    run_training(config, workdir)
  with pytest.raises(StorageError, match=str(blocker)):
    Checkpointer(workdir)


def test_float16_training_is_refused_with_bfloat16_advice(tmp_path):
  config = base_config()
  config.model.dtype = "float16"
  with pytest.raises(ValueError, match="bfloat16"):
    run_training(config, str(tmp_path))
  assert not os.listdir(tmp_path)  # refused before anything was written


# ---------------------------------------------------------------- subprocesses: train.py


def _captured(fn):
  try:
    return fn(), None
  except BaseException as e:  # re-raised by the test that needs it
    return None, e


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
  """The train.py scenarios, run side by side: a train.py process keeps about one core busy, so
  concurrent lanes use both cores of a CI machine. Lanes: SIGKILLs; SIGTERM; the shared reference
  run (unless tests/test_multihost.py made it) followed by the damaged-checkpoint fallback."""
  base = str(tmp_path_factory.getbasetemp() / "reliability")
  data_dir = chaos.prepare_data(os.path.join(base, "tfds"))
  env = chaos.subprocess_env(8)
  args = chaos.train_args(data_dir, STEPS, 1)

  def kills():
    return chaos.chaos(os.path.join(base, "chaos"), args, env, kills=2, seed=1, max_nth=1,
                       plan=["startup:Latent scale factor", "save"])

  def sigterm():
    return chaos.chaos(os.path.join(base, "sigterm"), args, env, kills=0, seed=0, plan=["sigterm"])

  def reference_and_fallback():
    ref = chaos.reference_run(base, STEPS)
    return ref, _fallback_run(base, ref, data_dir, env)

  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    lanes = {name: pool.submit(_captured, fn) for name, fn in
             (("kills", kills), ("sigterm", sigterm), ("reference", reference_and_fallback))}
    return {name: future.result() for name, future in lanes.items()}


def _result(scenarios, name):
  value, error = scenarios[name]
  if error is not None:
    raise error
  return value


def _fallback_run(base, ref, data_dir, env):
  """The reference's workdir with its latest step truncated, resumed with restore_fallback=True."""
  workdir = os.path.join(base, "fallback")
  shutil.copytree(ref, workdir, ignore=shutil.ignore_patterns("events.out.tfevents*"))
  _damage(os.path.join(workdir, "checkpoints", str(STEPS)), "truncate")
  log = workdir + ".log"
  chaos.run(workdir, chaos.train_args(data_dir, STEPS, 2) + ["--config.training.restore_fallback=True"],
            env, log)
  return workdir, chaos.read_log(log)


@pytest.mark.slow
def test_sigkills_lose_nothing_bit_exact(scenarios):
  """bench/chaos.py with 2 SIGKILLs: after the latent scale was estimated but before any checkpoint
  (while the frozen weights are written; the restart estimates the scale again and must match the
  reference's), and right after an async save began. chaos.chaos itself asserts every restart
  resumed from the newest committed step."""
  events = _result(scenarios, "kills")
  ref = _result(scenarios, "reference")[0]
  assert [e["kind"] for e in events] == ["startup", "save", "finish"]
  assert not any(e.get("missed") for e in events), events
  assert events[0]["returncode"] == events[1]["returncode"] == -9
  assert events[0]["committed_after"] == [] and events[1]["resumed_from"] is None
  workdir = os.path.join(os.path.dirname(ref), "chaos")
  assert chaos.bitwise_differences(chaos.read_checkpoint(workdir),
                                   chaos.read_checkpoint(ref, STEPS)) == []


@pytest.mark.slow
def test_sigterm_saves_the_last_step_exits_0_and_resumes_there(scenarios):
  ref = _result(scenarios, "reference")[0]
  sigterm, finish = _result(scenarios, "sigterm")
  # chaos.chaos asserted "(preempted)" and that the newest committed step is the last one done.
  assert sigterm["kind"] == "sigterm" and sigterm["returncode"] == 0 and not sigterm.get("missed")
  assert finish["resumed_from"] == sigterm["last_step_done"] and finish["returncode"] == 0
  workdir = os.path.join(os.path.dirname(ref), "sigterm")
  assert chaos.bitwise_differences(chaos.read_checkpoint(workdir),
                                   chaos.read_checkpoint(ref, STEPS)) == []


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_end_to_end(scenarios):
  """train.py with training.restore_fallback=True on a run whose latest step is truncated: it warns,
  resumes from the step before, and ends bit-exact with the uninterrupted run. (Without the option
  the same CheckpointRestoreError stops train.py with its message; see the in-process test.)"""
  ref, (workdir, text) = _result(scenarios, "reference")
  step_dir = os.path.join(workdir, "checkpoints", str(STEPS))
  previous = chaos.committed_steps(ref)[-2]
  assert f"checkpoint step {STEPS} in {step_dir} could not be restored" in text
  assert f"Resuming from {workdir}/checkpoints step {previous}" in text
  assert glob.glob(step_dir + ".corrupt-*")
  assert chaos.bitwise_differences(chaos.read_checkpoint(workdir),
                                   chaos.read_checkpoint(ref, STEPS)) == []
