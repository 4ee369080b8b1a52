"""A deterministic, resumable, multi-host iterator over in-memory example arrays.

Each epoch is a permutation drawn from (seed, epoch). A global batch takes the next `global_batch`
indices of that permutation and each process keeps its own contiguous slice, so processes never
see the same example in an epoch and the union of their slices is the global batch. The position
is one integer (global examples consumed), so saving and restoring it resumes exactly; it does
not depend on the number of processes. The global batch is sorted before it is split, so process
p's rows are rows p*B/P .. (p+1)*B/P of the single-process batch and every example meets the same
noise and timestep whatever the process count.

Debugging: with `$LDJ_DATA_INDEX_LOG` set to a directory (or `index_log` given), each batch's
position and this process's example indices are appended to `<dir>/process_<i>.jsonl`.
"""

import json
import os
from typing import Dict, Iterator, Optional

import numpy as np
from latent_diffusion_jax.core.errors import UserInputError

INDEX_LOG_ENV = "LDJ_DATA_INDEX_LOG"


def index_log_path(process_index: int) -> Optional[str]:
  """`<$LDJ_DATA_INDEX_LOG>/process_<i>.jsonl`, or None when the variable is unset."""
  directory = os.environ.get(INDEX_LOG_ENV)
  return os.path.join(directory, f"process_{process_index}.jsonl") if directory else None


class ArrayIterator(Iterator[Dict[str, np.ndarray]]):
  """Yields this process's share of successive global batches.

  Args:
    arrays: name -> array with a common first dimension (the examples).
    global_batch: examples per step over all processes.
    seed: permutation seed.
    process_index, process_count: this process's slice of each global batch.
    index_log: a JSON-lines file to append each batch's position and indices to (debugging).
  """

  def __init__(self, arrays: Dict[str, np.ndarray], global_batch: int, *, seed: int = 0,
               process_index: int = 0, process_count: int = 1, index_log: Optional[str] = None):
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
      raise UserInputError(f"Arrays differ in length: {sizes}.")
    self.num_examples = next(iter(sizes.values()))
    if global_batch % process_count:
      raise UserInputError(f"Global batch {global_batch} is not divisible by {process_count} processes.")
    if global_batch > self.num_examples:
      raise UserInputError(f"Global batch {global_batch} exceeds the {self.num_examples} examples.")
    self.arrays, self.global_batch, self.seed = arrays, global_batch, seed
    self.local_batch = global_batch // process_count
    self.process_index = process_index
    self.index_log = index_log
    self.position = 0  # global examples consumed
    self._epoch, self._perm = -1, None

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._epoch:
      self._epoch = epoch
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
    return self._perm

  def global_indices(self, position: int) -> np.ndarray:
    """Example indices of the global batch starting at `position` (batches never straddle epochs)."""
    per_epoch = self.num_examples // self.global_batch
    epoch, offset = divmod(position // self.global_batch, per_epoch)
    start = offset * self.global_batch
    return self._permutation(epoch)[start:start + self.global_batch]

  def __next__(self) -> Dict[str, np.ndarray]:
    idx = np.sort(self.global_indices(self.position))
    mine = idx[self.process_index * self.local_batch:(self.process_index + 1) * self.local_batch]
    if self.index_log:
      with open(self.index_log, "a") as f:
        f.write(json.dumps({"position": self.position, "indices": mine.tolist()}) + "\n")
    self.position += self.global_batch
    return {k: v[mine] for k, v in self.arrays.items()}

  def get_state(self) -> dict:
    return {"position": int(self.position), "seed": int(self.seed), "global_batch": int(self.global_batch)}

  def set_state(self, state: dict) -> None:
    if state.get("seed", self.seed) != self.seed or state.get("global_batch", self.global_batch) != self.global_batch:
      raise UserInputError(f"Data state {state} was saved with another seed or global batch than this run "
                       f"(seed {self.seed}, global batch {self.global_batch}); the position would not resume "
                       "the same data order.")
    self.position = int(state["position"])
