"""Reading latent shards encoded with aspect-ratio buckets: every global batch from one bucket.

The schedule (the same on every host, from the manifest and the seed alone): in each schedule
epoch bucket k gets n_k = N_k // global_batch batch slots, N_k its examples over all hosts, and
the slots are shuffled by a permutation seeded with (seed, epoch). Step s draws from the bucket of
slot s. So buckets are visited in proportion to their sizes, in an order no host has to agree on
by communicating.

Each host keeps one endless stream per bucket, read like unbucketed shards
(`latent_shards.latent_dataset`: its share of that bucket's non-empty files, windows, shuffles),
and step s takes the next local batch of its bucket's stream. Nothing is dropped inside a stream:
the N_k % global_batch examples left at the end of a schedule epoch open the bucket's batches of
the next one (a host's stream runs over its own files' epochs, as unbucketed reading does). What
is dropped is a whole bucket that cannot feed a global batch every epoch: fewer examples than one
global batch (n_k = 0), or non-empty files on fewer hosts than the run has processes. A warning
names them; a run where no bucket is left stops with an error.

Resuming: the position is still one integer, the steps taken. Bucket k's stream restarts after
the number of its slots among the first s, which the schedule computes without reading data.
"""

import dataclasses
import posixpath
from typing import Dict, List, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from latent_diffusion_jax.core.errors import UserInputError

# Separates the schedule's random stream from the per-host file orders (seeded [seed, host, ...]).
_SCHEDULE_TAG = 0xB0C4E75


class BucketSchedule:
  """Which bucket each global step draws from.

  Args:
    batches_per_epoch: slots n_k of each bucket in one schedule epoch (some may be 0).
    seed: the data-order seed.
  """

  def __init__(self, batches_per_epoch: Sequence[int], seed: int):
    self.batches_per_epoch = np.asarray(batches_per_epoch, np.int64)
    if self.batches_per_epoch.sum() <= 0:
      raise UserInputError("No bucket has a batch to give.")
    self.seed = int(seed)
    self._slots = np.repeat(np.arange(len(self.batches_per_epoch)), self.batches_per_epoch)
    self._cache: Dict[int, np.ndarray] = {}

  @property
  def epoch_length(self) -> int:
    return len(self._slots)

  def epoch(self, epoch: int) -> np.ndarray:
    """The bucket of every step of schedule epoch `epoch`."""
    if epoch not in self._cache:
      if len(self._cache) > 4:
        self._cache.clear()
      rng = np.random.default_rng([_SCHEDULE_TAG, self.seed, epoch])
      self._cache[epoch] = rng.permutation(self._slots)
    return self._cache[epoch]

  def bucket_of(self, step: int) -> int:
    epoch, offset = divmod(int(step), self.epoch_length)
    return int(self.epoch(epoch)[offset])

  def consumed(self, step: int) -> np.ndarray:
    """Batches each bucket has given in steps [0, step)."""
    epoch, offset = divmod(int(step), self.epoch_length)
    partial = np.bincount(self.epoch(epoch)[:offset], minlength=len(self.batches_per_epoch))
    return epoch * self.batches_per_epoch + partial

  def buckets_from(self, step: int):
    """The endless bucket sequence from `step` on."""
    step = int(step)
    while True:
      yield self.bucket_of(step)
      step += 1


@dataclasses.dataclass
class BucketPlan:
  """The buckets a run reads and this host's files of each."""
  sizes: List[List[int]]            # pixel (height, width) of every bucket of the manifest
  shapes: List[List[int]]           # stored latent shape of every bucket
  used: List[int]                   # buckets that get batches, in schedule order
  schedule: BucketSchedule          # over `used`
  host_files: List[List[str]]       # per used bucket: this host's files
  host_counts: List[List[int]]      # and their record counts


def plan_buckets(manifest: dict, files: Sequence[str], counts: Sequence[int], field: str, *,
                 global_batch: int, seed: int, process_index: int,
                 process_count: int) -> BucketPlan:
  """Groups shard files by bucket, drops the buckets that cannot feed the run, splits the rest.

  Args:
    manifest: the (first) manifest; its "buckets" list sizes and stored shapes.
    files, counts: every latent shard file and its record count (`resolve_shards`).
    field: "moments" or "latents".
    global_batch, seed, process_index, process_count: the run.
  """
  sizes = [list(b["size"]) for b in manifest["buckets"]]
  shapes = [list(b[f"{field}_shape"]) for b in manifest["buckets"]]
  per_bucket: List[List[tuple]] = [[] for _ in sizes]
  for path, count in zip(files, counts):
    name = posixpath.basename(path)
    bucket = _bucket_of(manifest, name, path)
    if count > 0:  # empty files would give a host nothing to read
      per_bucket[bucket].append((path, count))
  used, batches, host_files, host_counts, dropped = [], [], [], [], []
  for k, entries in enumerate(per_bucket):
    total = sum(c for _, c in entries)
    if total < global_batch or len(entries) < process_count:
      dropped.append(f"{tuple(sizes[k])}: {total} examples in {len(entries)} non-empty files")
      continue
    used.append(k)
    batches.append(total // global_batch)
    mine = entries[process_index::process_count]
    host_files.append([p for p, _ in mine])
    host_counts.append([c for _, c in mine])
  if dropped:
    logging.warning("Buckets left out (fewer examples than one global batch of %d, or non-empty "
                    "files on fewer than %d hosts): %s", global_batch, process_count,
                    "; ".join(dropped))
  if not used:
    raise UserInputError(f"No bucket of the latent shards can feed a global batch of {global_batch} "
                         f"on {process_count} processes ({'; '.join(dropped)}).")
  logging.info("Bucket schedule: %s batches per epoch of buckets %s",
               batches, [tuple(sizes[k]) for k in used])
  return BucketPlan(sizes, shapes, used, BucketSchedule(batches, seed), host_files, host_counts)


def _bucket_of(manifest: dict, name: str, path: str) -> int:
  # Files of other directories are listed in their own manifests, which agree on the buckets.
  entry = manifest["shards"].get(name)
  if entry is not None and "bucket" in entry:
    return int(entry["bucket"])
  stem = name.rsplit(".", 2)
  if len(stem) == 3 and stem[1].startswith("b") and stem[1][1:].isdigit():
    return int(stem[1][1:])
  raise UserInputError(f"{path} has no bucket in its manifest (not written by a bucketed encode).")


def bucketed_dataset(plan: BucketPlan, make_stream, start_batch: int) -> tf.data.Dataset:
  """This host's batches from step `start_batch` on, each from the scheduled bucket.

  Args:
    plan: from `plan_buckets`.
    make_stream: (used-bucket position, files, counts, latent shape, start batch) -> the
      endless tf.data stream of that bucket's local batches.
    start_batch: steps already taken.
  """
  consumed = plan.schedule.consumed(start_batch)
  streams = [make_stream(i, plan.host_files[i], plan.host_counts[i], plan.shapes[k],
                         int(consumed[i]))
             for i, k in enumerate(plan.used)]
  choice = tf.data.Dataset.from_generator(lambda: plan.schedule.buckets_from(start_batch),
                                          output_signature=tf.TensorSpec([], tf.int64))
  return tf.data.Dataset.choose_from_datasets(streams, choice)

