"""Resuming a run from its latest committed step, falling back past damaged ones when allowed."""

from typing import Any, Tuple

import jax
import numpy as np
from absl import logging

from latent_diffusion_jax.checkpoints.checkpointer import Checkpointer, CheckpointRestoreError


def _restore_complete(checkpointer: Checkpointer, step: int, abstract: Any) -> Tuple[Any, Any, Any]:
  state, data, meta = checkpointer.restore(step, abstract_state=abstract)
  # The trainers always save all three items; a step without its data position would silently
  # restart the data order, one without meta would re-derive the latent scale.
  missing = [name for name, value in (("data", data), ("meta", meta)) if value is None]
  if missing:
    raise CheckpointRestoreError(
        f"checkpoint step {step} in {checkpointer.directory} lacks its {' and '.join(missing)} "
        "item(s); it is incomplete. Move it away or set training.restore_fallback=True.")
  return state, data, meta


def _agree(ok: bool) -> bool:
  """Whether every process succeeded, so all of them take the same fallback path."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def resume(checkpointer: Checkpointer, abstract: Any, *, fallback: bool) -> Tuple[Any, Any, Any]:
  """Restores the latest committed step; with `fallback`, damaged steps give way to older ones.

  Once an older step restores, the damaged newer ones are quarantined (renamed, see
  `Checkpointer.quarantine`) so the resumed run can write those step numbers again. When no step
  restores, nothing is renamed.

  Returns:
    (state, data, meta) of the step restored.

  Raises:
    CheckpointRestoreError: when the latest step (or, with `fallback`, every step) fails to restore.
  """
  steps = checkpointer.all_steps()
  damaged = []
  for step in reversed(steps):
    logging.info("Resuming from %s step %d", checkpointer.directory, step)
    error = None
    try:
      restored = _restore_complete(checkpointer, step, abstract)
    except CheckpointRestoreError as e:
      error = e
    if _agree(error is None):
      for bad in damaged:
        logging.warning("Moved damaged checkpoint step %d to %s.", bad, checkpointer.quarantine(bad))
      return restored
    error = error or CheckpointRestoreError(f"checkpoint step {step} failed on another process.")
    if not fallback:
      raise error
    damaged.append(step)
    logging.warning("%s Trying the previous committed step (training.restore_fallback=True).", error)
  raise CheckpointRestoreError(f"no checkpoint in {checkpointer.directory} could be restored "
                               f"(tried steps {steps[::-1]}); see the warnings above.")
