"""What the shard readers share: file patterns, the split of files over hosts, resumable batches."""

import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from absl import logging
from latent_diffusion_jax.core.errors import InputFileError, MissingInputError, UserInputError


_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> List[str]:
  """Expands `{a,b}` lists and `{000..127}` zero-padded ranges, innermost first."""
  match = _BRACE.search(pattern)
  if match is None:
    return [pattern]
  body = match.group(1)
  numeric = _RANGE.match(body)
  if numeric:
    lo, hi = numeric.groups()
    width = len(lo) if lo.lstrip("-").startswith("0") or len(lo) == len(hi) else 0
    step = 1 if int(hi) >= int(lo) else -1
    options = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
  else:
    options = body.split(",")
  out = []
  for option in options:
    out.extend(expand_braces(pattern[:match.start()] + option + pattern[match.end():]))
  return out



def expand_patterns(patterns: str | Sequence[str]) -> List[str]:
  """Shard paths named by comma-free patterns: brace expansion, then tf.io.gfile.glob.

  Args:
    patterns: one pattern or several. A path without glob characters is kept even if it does not
      exist (the reader then counts it as an unreadable shard); a glob must match something.

  Returns:
    The paths in pattern order (each glob's matches sorted), duplicates removed.

  Raises:
    FileNotFoundError: a glob matched no file.
  """
  if isinstance(patterns, str):
    patterns = [patterns]
  out: Dict[str, None] = {}
  for pattern in patterns:
    for path in expand_braces(pattern):
      if any(c in path for c in "*?["):
        matches = sorted(tf.io.gfile.glob(path))
        if not matches:
          raise MissingInputError(f"Shard pattern {path!r} (from {pattern!r}) matched no file.")
        out.update(dict.fromkeys(matches))
      else:
        out[path] = None
  return list(out)




def host_files(files: Sequence[str], global_batch: int, what: str, process_index: Optional[int],
               process_count: Optional[int]) -> Tuple[int, int, List[str]]:
  """(process index, process count, this host's files): every host reads its own files.

  Raises:
    ValueError: a global batch that does not split over the processes, or fewer files than hosts.
  """
  import jax
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if global_batch % pc:
    raise UserInputError(f"Global batch {global_batch} is not divisible by {pc} processes.")
  if len(files) < pc:
    raise UserInputError(f"{len(files)} {what} cannot feed {pc} hosts (one file each at least).")
  return pi, pc, list(files[pi::pc])


class ResumableBatches:
  """Iterates a deterministic tf.data pipeline of host batches; its state is the batch count.

  `make_dataset(start_batch)` must build the pipeline positioned after `start_batch` batches. The
  pipeline is built lazily, so `set_state` before the first batch costs nothing.

  Args:
    make_dataset: start batch -> tf.data.Dataset of host batches.
    postprocess: applied to each numpy batch (e.g. tokenizing captions), or None.
    identity: JSON values that must match between the saved and the resuming run (seed, global
      batch, ...): a different one would make the position mean other data.
    advisory: values whose change still resumes at the same batch count, only not with the very
      same examples (process count, file list); a mismatch is logged.
  """

  def __init__(self, make_dataset: Callable[[int], tf.data.Dataset], *,
               postprocess: Optional[Callable[[dict], dict]] = None,
               identity: Optional[dict] = None, advisory: Optional[dict] = None):
    self._make_dataset, self._postprocess = make_dataset, postprocess
    self.identity, self.advisory = dict(identity or {}), dict(advisory or {})
    self.batches = 0
    self._iterator = None

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self._make_dataset(self.batches).as_numpy_iterator()
    try:
      batch = next(self._iterator)
    except StopIteration:  # the pipelines repeat forever, so this means nothing is usable
      raise InputFileError("The data pipeline yields no examples (every sample skipped?).") from None
    self.batches += 1
    return self._postprocess(batch) if self._postprocess else batch

  def get_state(self) -> dict:
    """The JSON position: batches consumed (the same on every host) plus the run's identity."""
    return {"batches": int(self.batches), **self.identity, **self.advisory}

  def set_state(self, state: dict) -> None:
    """Moves to a `get_state` position (of this or an earlier run); the next batch rebuilds the
    pipeline there. Raises ValueError when the state belongs to other data or another order."""
    if "batches" not in state:
      raise UserInputError(f"Data state {state} was not saved by this reader (another data.kind?).")
    for name, value in self.identity.items():
      if name in state and state[name] != value:
        raise UserInputError(f"Data state {state} was saved with {name}={state[name]!r}, this run has "
                         f"{value!r}; the saved position would not resume the same data.")
    for name, value in self.advisory.items():
      if name in state and state[name] != value:
        logging.warning("Data state saved with %s=%r, this run has %r: resuming at batch %d, but "
                        "hosts now read other examples than an uninterrupted run would.", name,
                        state[name], value, state["batches"])
    self.batches = int(state["batches"])
    self._iterator = None
