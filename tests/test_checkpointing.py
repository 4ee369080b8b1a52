"""Orbax checkpointing of sharded state on 8 fake CPU devices: round trips, retention, commits."""

import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from jax.sharding import PartitionSpec as P

from latent_diffusion_jax.core.errors import StorageError
from latent_diffusion_jax.core import parallel
from latent_diffusion_jax.checkpoints import checkpointer as checkpointing
from latent_diffusion_jax.checkpoints.checkpointer import Checkpointer, RestoreSource


# Built once: a transformation made inside _init would give every call a different pytree treedef.
_TX = optax.adam(1e-3)


def _init(offset):
  """A TrainState with boxed params; arange values keep compiling cheap (no random kernels)."""
  def box(shape, names, dtype=jnp.float32):
    value = (jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape) / 7 + offset)
    return nn.LogicallyPartitioned(value.astype(dtype), names)
  params = {
      "conv": {"kernel": box((3, 3, 3, 16), (None, None, "conv_in", "conv_out")),
               "bias": box((16,), ("conv_out",))},
      "fc": {"kernel": box((16, 8), ("embed", "mlp"), jnp.bfloat16)},
      "norm": {"scale": box((16,), ("norm",))},
  }
  return train_state.TrainState.create(apply_fn=None, params=params, tx=_TX)


@pytest.fixture(scope="module")
def mesh():
  return parallel.create_mesh((2, 2, 2))


@pytest.fixture(scope="module")
def state_and_abstract(mesh):
  state, _ = parallel.create_sharded_state(_init, jnp.float32(0.5), mesh=mesh)
  abstract, _ = parallel.sharded_abstract_state(_init, jnp.float32(0.5), mesh=mesh)
  return state, abstract


def _assert_same(restored, original):
  assert jax.tree.structure(restored) == jax.tree.structure(original)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(original)):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.sharding == b.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_save_restore_sharded_bit_exact(tmp_path, state_and_abstract):
  state, abstract = state_and_abstract
  assert state.params["fc"]["kernel"].sharding.spec == P("fsdp", "tensor")
  data = {"shard": 3, "offset": 1024, "epoch": 0}
  meta = {"config": {"lr": 1e-4, "mesh": [2, 2, 2]}, "latent_scale": 0.18215, "version": "0.1.0"}
  with Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=2) as ckpt:
    assert ckpt.save(10, state, data=data, meta=meta)
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [10] and ckpt.latest_step() == 10
    restored, got_data, got_meta = ckpt.restore(abstract_state=abstract)
  assert isinstance(restored, train_state.TrainState)
  _assert_same(restored, state)
  assert got_data == data and got_meta == meta
  # A fresh process would reopen read-only and may use concrete arrays as the target.
  reader = Checkpointer(tmp_path, read_only=True)
  restored, _, _ = reader.restore(10, abstract_state=state)
  _assert_same(restored, state)
  reader.close()


def test_restore_onto_other_mesh(tmp_path, state_and_abstract):
  state, _ = state_and_abstract
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, state)
    other = parallel.create_mesh({"tensor": 8})
    abstract, _ = parallel.sharded_abstract_state(_init, jnp.float32(0.5), mesh=other)
    restored, data, meta = ckpt.restore(1, abstract_state=abstract)
  assert data is None and meta is None
  assert restored.params["conv"]["bias"].sharding.spec == P("tensor")
  assert dict(restored.params["conv"]["bias"].sharding.mesh.shape)["tensor"] == 8
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               restored, state)


def test_relative_workdir_saves_and_restores(tmp_path, monkeypatch, state_and_abstract):
  """`make demo` passes workdirs/demo/...: a relative workdir resolves against the cwd."""
  state, abstract = state_and_abstract
  monkeypatch.chdir(tmp_path)
  with Checkpointer("runs/rel", async_save=False) as ckpt:
    ckpt.save(1, state)
  assert (tmp_path / "runs" / "rel" / "checkpoints" / "1").is_dir()
  restored, _, _ = Checkpointer("runs/rel", read_only=True).restore(1, abstract_state=abstract)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               restored, state)


def test_interval_keep_k_and_async_wait(tmp_path, state_and_abstract):
  state, _ = state_and_abstract
  with Checkpointer(tmp_path, save_interval_steps=2, max_to_keep=2, async_save=True) as ckpt:
    saved = [ckpt.save(s, state, data={"step": s}) for s in range(1, 8)]
    assert saved == [False, True, False, True, False, True, False]
    assert not ckpt.save(6, state, force=True)  # preemption right after an interval save
    assert ckpt.save(7, state, data={"step": 7}, force=True)
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [6, 7]
    _, data, _ = ckpt.restore()
    assert data == {"step": 7}
  assert sorted(os.listdir(checkpointing.checkpoint_dir(tmp_path))) == ["6", "7"]


def test_unfinished_tmp_dir_is_ignored(tmp_path, state_and_abstract):
  state, _ = state_and_abstract
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(5, state, meta={"ok": True})
    # A crash mid-save leaves orbax's temporary directory behind, possibly with items in it.
    tmp = checkpointing.checkpoint_dir(tmp_path) / "9.orbax-checkpoint-tmp-1700000000"
    (tmp / "state").mkdir(parents=True)
    (tmp / "meta").mkdir()
    assert ckpt.all_steps() == [5] and ckpt.latest_step() == 5
    _, _, meta = ckpt.restore()
    assert meta == {"ok": True}
    with pytest.raises(FileNotFoundError, match="step 9"):
      ckpt.restore(9)
  assert checkpointing.resolve_restore_source(tmp_path) == RestoreSource("workdir", str(tmp_path),
                                                                          5)


def test_unwritable_workdir_names_path(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(StorageError, match=str(blocker / "run" / "checkpoints")):
    Checkpointer(blocker / "run")
  if os.geteuid() != 0:  # root ignores permission bits
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(StorageError, match=str(locked)):
      Checkpointer(locked / "run")


def test_json_items_must_serialize(tmp_path, state_and_abstract):
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    with pytest.raises(TypeError, match="meta"):
      ckpt.save(1, state_and_abstract[0], meta={"dtype": jnp.float32})


def test_restore_without_checkpoint_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match="never_ran"):
    Checkpointer(tmp_path / "never_ran", read_only=True)
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
      ckpt.restore()


def test_resume_order(tmp_path, state_and_abstract):
  state, _ = state_and_abstract
  run, pretrained, weights = tmp_path / "run", tmp_path / "pretrained", tmp_path / "w.safetensors"
  weights.write_bytes(b"")
  assert checkpointing.resolve_restore_source(run, None) == RestoreSource("scratch")
  with pytest.raises(FileNotFoundError, match="missing_ckpt"):
    checkpointing.resolve_restore_source(run, str(tmp_path / "missing_ckpt"))
  assert (checkpointing.resolve_restore_source(run, str(weights))
          == RestoreSource("init", str(weights), None))
  with Checkpointer(pretrained, async_save=False) as ckpt:
    ckpt.save(3, state)
    ckpt.save(4, state)
  # Another run's workdir gives its latest step; one of its step dirs gives that step.
  assert (checkpointing.resolve_restore_source(run, str(pretrained))
          == RestoreSource("init", str(pretrained), 4))
  step_dir = checkpointing.checkpoint_dir(pretrained) / "3"
  assert (checkpointing.resolve_restore_source(run, str(step_dir))
          == RestoreSource("init", str(pretrained), 3))
  # Once the run has its own checkpoint it resumes from it, whatever init_checkpoint says.
  with Checkpointer(run, async_save=False) as ckpt:
    ckpt.save(2, state)
  assert (checkpointing.resolve_restore_source(run, str(pretrained))
          == RestoreSource("workdir", str(run), 2))
  assert (checkpointing.resolve_restore_source(run, str(tmp_path / "missing_ckpt"))
          == RestoreSource("workdir", str(run), 2))


def test_sigterm_sets_preemption_flag(tmp_path):
  before = signal.getsignal(signal.SIGTERM)
  with Checkpointer(tmp_path) as ckpt:
    assert not ckpt.reached_preemption(1)
    ckpt.install_sigterm_handler()
    os.kill(os.getpid(), signal.SIGTERM)
    assert ckpt.reached_preemption(2)
  assert signal.getsignal(signal.SIGTERM) is before
