"""Preemption-safe Orbax checkpoints: sharded train state plus data position plus metadata.

Layout: `<workdir>/checkpoints/<step>/{state,data,meta}`. Orbax writes each step into
`<step>.orbax-checkpoint-tmp-*` and renames it when complete (on object stores that cannot rename,
it writes `commit_success.txt` last instead), so a step that is listed is a step that was
finished; half-written ones are invisible and removed when the next Checkpointer opens the dir.

Items of a step:
  state  pytree of (sharded) jax.Arrays, restored onto the shardings of an abstract target.
  data   JSON: the input pipeline's position. Only process 0 writes it, so on several hosts it
         must describe every host's position (e.g. derive it from step and seed).
  meta   JSON: config, latent scale factor, code version, anything needed to interpret `state`.

Resume order (`resolve_restore_source`), first match wins:
  1. the latest committed step in `<workdir>/checkpoints` (a restarted or preempted run resumes),
  2. `init_checkpoint` (fine-tuning start: another run's workdir, one of its step dirs, or foreign
     weights such as a diffusers directory / safetensors file for interop/ to load),
  3. scratch (fresh initialization).
So a preempted fine-tuning run never re-initializes from the pretrained weights.

Preemption: call `reached_preemption(step)` every step; when True, save with `force=True`,
`wait_until_finished()` and exit 0.

Faults: a step that cannot be restored (a truncated or deleted file) raises
`CheckpointRestoreError` naming its directory; `quarantine(step)` renames such a step to
`<step>.corrupt-<time>`, which Orbax no longer lists, so a run can fall back to the step before it
and later write that step number again. A save that fails (disk full, directory gone), in the
foreground or in the background thread, raises `CheckpointWriteError` naming the directory and step.
"""

import dataclasses
import json
import os
import signal
import threading
import time
from typing import Any, List, Optional, Tuple

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp
from latent_diffusion_jax.core.errors import InputFileError, MissingInputError, StorageError

CHECKPOINT_SUBDIR = "checkpoints"
_ITEMS = ("state", "data", "meta")


class CheckpointRestoreError(InputFileError):
  """A committed step could not be read back (damaged files, or another model's state)."""


class CheckpointWriteError(StorageError):
  """A checkpoint could not be written (disk full, unwritable or vanished directory)."""


_STORAGE_CAUSES = ("No space left on device", "Disk quota exceeded", "Read-only file system",
                   "Permission denied", "Not a directory", "No such file or directory")


def _short(e: BaseException, limit: int = 600) -> str:
  """One line for train.py's exit message; a storage cause buried in Orbax's long text goes first."""
  text = " ".join(f"{type(e).__name__}: {e}".split())
  cause = next((c for c in _STORAGE_CAUSES if c in text), None)
  text = text if len(text) <= limit else text[:limit] + " ..."
  return f"{cause} ({text})" if cause else text


def _use_single_replica_writes() -> None:
  """On CPU, write each replicated array from one replica.

  Orbax's default (replica-parallel) slices every replicated array across its replicas with a
  small jitted program per distinct shape; on CPU that compiles hundreds of programs at the first
  save of every process (~10 s for the tiny configs) and saves nothing, as host copies are free.
  """
  if jax.default_backend() != "cpu":
    return
  current = ocp.type_handlers.get_type_handler(jax.Array)
  if getattr(current, "_use_replica_parallel", False):
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            use_replica_parallel=False,
            array_metadata_store=getattr(current, "_array_metadata_store", None)),
        override=True)


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  """Where a run keeps its checkpoints, apart from logs and samples in the same workdir.

  A relative local path is made absolute (Orbax refuses relative ones); URLs (gs://...) are kept.
  """
  if "://" not in os.fspath(workdir):
    workdir = os.path.abspath(os.fspath(workdir))
  return epath.Path(workdir) / CHECKPOINT_SUBDIR


def _committed_steps(directory: epath.Path) -> List[int]:
  if not directory.is_dir():
    return []
  # find_all skips temporary (unfinished) step directories.
  found = ocp.step.standard_name_format().find_all(directory)
  return sorted(m.step for m in found)


def _check_writable(directory: epath.Path) -> None:
  probe = directory / f".write_probe.{jax.process_index()}"
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise StorageError(f"checkpoint directory {directory} is not writable: {e}") from e


def _abstract(x: Any) -> Any:
  """ShapeDtypeStruct keeping the sharding, so concrete arrays can serve as restore targets."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def _check_json(name: str, value: Any) -> None:
  # Async saves would otherwise fail later in a background thread.
  try:
    json.dumps(value)
  except (TypeError, ValueError) as e:
    raise TypeError(f"checkpoint item {name!r} must be JSON-serializable: {e}") from e


class Checkpointer:
  """Saves and restores composite checkpoints of one run.

  Usable as a context manager; `close()` waits for pending saves.
  """

  def __init__(self, workdir: str | os.PathLike, *, save_interval_steps: int = 1,
               max_to_keep: Optional[int] = None, async_save: bool = True,
               read_only: bool = False):
    """Opens (and for writers creates) `<workdir>/checkpoints`.

    Args:
      workdir: the run directory (local path or a path etils.epath understands, e.g. gs://).
      save_interval_steps: `save` without `force` only writes steps divisible by this.
      max_to_keep: keep this many most recent checkpoints; None keeps all.
      async_save: write in a background thread after the arrays are copied off the devices.
      read_only: open an existing run for restoring only (sampling, init from another run).

    Raises:
      StorageError: when the checkpoint directory cannot be created or written, naming it.
      FileNotFoundError: when `read_only` and the run has no checkpoint directory.
    """
    self.directory = checkpoint_dir(workdir)
    if read_only and not self.directory.is_dir():
      raise MissingInputError(f"no checkpoint directory {self.directory}")
    if not read_only:
      _check_writable(self.directory)
    if read_only:
      when = dict(save_interval_steps=0)
    else:
      # Orbax's default policy also saves the first step of a fresh run, a surprise with
      # multi-GB states; here only the interval and multi-host preemption sync points save.
      policies = ocp.checkpoint_managers
      when = dict(save_decision_policy=policies.AnySavePolicy([
          policies.FixedIntervalPolicy(save_interval_steps),
          policies.PreemptionCheckpointingPolicy()]))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, read_only=read_only,
        create=not read_only, cleanup_tmp_directories=not read_only, **when)
    _use_single_replica_writes()
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)
    self._sigterm = threading.Event()
    self._previous_handler = None
    self._in_flight: Optional[int] = None  # the step an async save is still writing

  def save(self, step: int, state: Any, data: Any = None, meta: Any = None,
           force: bool = False) -> bool:
    """Saves `step` if the interval (or `force`) says so.

    Args:
      step: training step. Saving a step that already exists does nothing and returns False.
      state: pytree of jax.Arrays (sharded or not).
      data: JSON-serializable input-pipeline position, or None.
      meta: JSON-serializable metadata, or None.
      force: save regardless of the interval (preemption, end of training).

    Returns:
      Whether a save was started. With async_save it completes in the background.

    Raises:
      CheckpointWriteError: when this save, or the previous one still in flight, failed.
    """
    # The manager's list includes saves still in flight; a preemption save right after an
    # interval save of the same step is then a no-op instead of an error.
    if step in self._manager.all_steps():
      logging.info("Checkpoint step %d already saved to %s", step, self.directory)
      return False
    items = {"state": ocp.args.StandardSave(state)}
    for name, value in (("data", data), ("meta", meta)):
      if value is not None:
        _check_json(name, value)
        items[name] = ocp.args.JsonSave(value)
    if not force and not self._manager.should_save(step):
      return False
    # Orbax would wait for the previous async save anyway; waiting here names its step on failure.
    self.wait_until_finished()
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # any failure to write is fatal for the run; say where and what
      raise self._write_error(step, e) from e
    if saved:
      self._in_flight = step
      logging.info("Saving checkpoint step %d to %s", step, self.directory)
    return saved

  def _write_error(self, step: int, e: BaseException) -> CheckpointWriteError:
    return CheckpointWriteError(
        f"could not write checkpoint step {step} to {self.directory}: {_short(e)}. Free space or "
        f"fix the directory's permissions; the last committed step is {self.latest_step()}, and a "
        "restart resumes from it.")

  def restore(self, step: Optional[int] = None, abstract_state: Any = None
              ) -> Tuple[Any, Any, Any]:
    """Restores a committed step.

    Args:
      step: the step; None means the latest.
      abstract_state: the target structure: a pytree of `jax.ShapeDtypeStruct` with `.sharding`
        (e.g. from `parallel.sharded_abstract_state`) or of concrete arrays; arrays come back
        with exactly these shardings, so a run may resume on a different mesh. None restores
        with the shardings recorded at save time (same topology only).

    Returns:
      (state, data, meta); data / meta are None when that step saved none.

    Raises:
      FileNotFoundError: when there is no committed checkpoint (at that step).
      CheckpointRestoreError: when the step's files cannot be read into `abstract_state`.
    """
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise MissingInputError(f"no committed checkpoint in {self.directory}")
      step = steps[-1]
    elif step not in steps:
      raise MissingInputError(f"no committed checkpoint for step {step} in {self.directory}; "
                              f"committed steps: {steps}")
    target = None if abstract_state is None else jax.tree.map(_abstract, abstract_state)
    step_dir = ocp.step.build_step_path(self.directory, ocp.step.standard_name_format(), step)
    items = {"state": ocp.args.StandardRestore(target)}
    for name in ("data", "meta"):
      if (step_dir / name).exists():
        items[name] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax / tensorstore raise many types for damaged files
      raise CheckpointRestoreError(
          f"checkpoint step {step} in {step_dir} could not be restored ({_short(e)}). Its files "
          "are damaged or incomplete, or it holds another model's state. Move that directory "
          "away to resume from the step before it, or set training.restore_fallback=True to do "
          "so automatically.") from e
    logging.info("Restored checkpoint step %d from %s", step, self.directory)
    return restored["state"], restored.get("data"), restored.get("meta")

  def restore_subtree(self, step: int, target: Any) -> Any:
    """Reads only the arrays of `target` (a nested dict of `jax.ShapeDtypeStruct` with shardings,
    keyed like the saved state, e.g. {"ema_params": {"unet": ...}}) from the state of `step`.

    Sampling and export read one params tree this way instead of the whole train state, whose
    optimizer moments are about twice the weights again.

    Raises:
      FileNotFoundError: `step` is not committed.
      CheckpointRestoreError: the step does not hold these arrays with these shapes.
    """
    if step not in self.all_steps():
      raise MissingInputError(f"no committed checkpoint for step {step} in {self.directory}; "
                              f"committed steps: {self.all_steps()}")
    restore = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(state=restore))
    except Exception as e:  # orbax / tensorstore raise many types for damaged or foreign files
      raise CheckpointRestoreError(
          f"checkpoint step {step} in {self.directory} could not be read as "
          f"{sorted(target)} ({_short(e)}).") from e
    return restored["state"]

  def quarantine(self, step: int) -> str:
    """Renames a damaged step to `<step>.corrupt-<time>` (kept for inspection, no longer listed).

    Afterwards this run may write `step` again. On several processes all must call it; process 0
    renames.

    Returns:
      The new path.
    """
    step_dir = ocp.step.build_step_path(self.directory, ocp.step.standard_name_format(), step)
    target = self.directory / f"{step}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
      step_dir.rename(target)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes(f"checkpointer_quarantine_{step}")
    self._manager.reload()
    return os.fspath(target)

  def read_meta(self, step: Optional[int] = None) -> Tuple[int, Any]:
    """(step, meta) of a committed step (default latest) without reading the state."""
    steps = self.all_steps()
    if not steps or (step is not None and step not in steps):
      raise MissingInputError(f"no committed checkpoint{'' if step is None else f' for step {step}'} "
                              f"in {self.directory}; committed steps: {steps}")
    step = steps[-1] if step is None else step
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return step, restored["meta"]

  def all_steps(self) -> List[int]:
    """Committed steps, ascending (saves still in flight are not included)."""
    return _committed_steps(self.directory)

  def latest_step(self) -> Optional[int]:
    """The newest committed step, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def install_sigterm_handler(self) -> None:
    """Turns SIGTERM into a flag `reached_preemption` reports, instead of killing the process.

    Single-process only: with several processes a flag seen by one host would make hosts disagree
    about saving, and replacing the handler would silence JAX's own preemption notifier, which
    `reached_preemption` already consults through Orbax. Must be called from the main thread.
    """
    if jax.process_count() > 1:
      logging.info("Multi-process run: relying on JAX's preemption service for SIGTERM.")
      return
    if self._previous_handler is None:
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del frame
    logging.warning("Received signal %d; will save and stop at the next step.", signum)
    self._sigterm.set()

  def reached_preemption(self, step: int) -> bool:
    """True when the run should save now and exit (all hosts agree on the step)."""
    return self._manager.reached_preemption(step) or self._sigterm.is_set()

  def wait_until_finished(self) -> None:
    """Blocks until pending async saves are committed.

    Raises:
      CheckpointWriteError: when the save in flight failed in the background.
    """
    step, self._in_flight = self._in_flight, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # the background thread's error, re-raised once by Orbax
      raise self._write_error(step, e) from e

  def close(self) -> None:
    """Waits for pending saves, releases Orbax resources and restores the SIGTERM handler."""
    self.wait_until_finished()
    self._manager.close()
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


@dataclasses.dataclass(frozen=True)
class RestoreSource:
  """Where a run's state comes from.

  Attributes:
    kind: "workdir" (resume), "init" (start from another checkpoint) or "scratch".
    path: for an Orbax source, a workdir to open with `Checkpointer(path, read_only=True)`;
      for foreign weights, the file or directory as given; None for scratch.
    step: the step to restore from an Orbax source; None otherwise.
  """
  kind: str
  path: Optional[str] = None
  step: Optional[int] = None


def _init_source(init_checkpoint: str) -> RestoreSource:
  path = epath.Path(init_checkpoint)
  if not path.exists():
    raise MissingInputError(f"init checkpoint {init_checkpoint} does not exist")
  if checkpoint_dir(path).is_dir():  # another run's workdir
    steps = _committed_steps(checkpoint_dir(path))
    if not steps:
      raise MissingInputError(f"init checkpoint {init_checkpoint} has no committed checkpoint in "
                              f"{checkpoint_dir(path)}")
    return RestoreSource("init", os.fspath(path), steps[-1])
  if path.parent.name == CHECKPOINT_SUBDIR and path.name.isdigit():  # one step of a run
    step = int(path.name)
    if step not in _committed_steps(path.parent):
      raise MissingInputError(f"init checkpoint {init_checkpoint} is not a committed step")
    return RestoreSource("init", os.fspath(path.parent.parent), step)
  return RestoreSource("init", os.fspath(path), None)


def resolve_restore_source(workdir: str | os.PathLike,
                           init_checkpoint: Optional[str] = None) -> RestoreSource:
  """Applies the resume order: workdir latest step > init checkpoint > scratch.

  Args:
    workdir: this run's directory.
    init_checkpoint: optional path to start from when the workdir has no checkpoint.

  Returns:
    The chosen `RestoreSource`.

  Raises:
    FileNotFoundError: when `init_checkpoint` is needed but missing (or has no committed step).
  """
  steps = _committed_steps(checkpoint_dir(workdir))
  if steps:
    source = RestoreSource("workdir", os.fspath(workdir), steps[-1])
  elif init_checkpoint:
    source = _init_source(init_checkpoint)
  else:
    source = RestoreSource("scratch")
  logging.info("Restore source: %s", source)
  return source
