"""Generated images kept on disk in numbered shards, so an interrupted evaluation resumes.

  <out>/generated/manifest.json        the generation settings and the shard size
  <out>/generated/shard_00000.npz      images [k, H, W, 3] uint8, their indices and captions

Shard k holds images k * shard_size .. (k + 1) * shard_size - 1; image i is the same image whatever
the run that made it (it starts from `fold_in(PRNGKey(seed), i)`, see sampling.generate's
`first_index`), so a resumed run, or one asking for more images, only makes the missing shards.
A shard file appears only once complete (written to a temporary name, then renamed).
"""

import json
import os
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import numpy as np

from latent_diffusion_jax.core.errors import InputFileError, StorageError, UserInputError

MANIFEST = "manifest.json"


class ShardStore:
  """The shards of one generation setting in `directory`.

  Args:
    directory: where shards live (created).
    settings: what makes the images (model, sampler, steps, guidance, seed, ...): JSON values. A
      directory holding shards of other settings is refused, naming the settings that differ.
    shard_size: images per shard; part of the settings.
  """

  def __init__(self, directory: str, settings: Dict[str, Any], shard_size: int):
    if shard_size < 1:
      raise UserInputError(f"shard_size must be >= 1, got {shard_size}")
    self.directory, self.shard_size = directory, shard_size
    self.settings = json.loads(json.dumps(dict(settings, shard_size=shard_size)))
    path = os.path.join(directory, MANIFEST)
    if os.path.exists(path):
      with open(path) as f:
        stored = json.load(f)["settings"]
      differ = sorted(k for k in set(stored) | set(self.settings)
                      if stored.get(k) != self.settings.get(k))
      if differ:
        details = "; ".join(f"{k}: {stored.get(k)!r} there, {self.settings.get(k)!r} now"
                            for k in differ)
        raise UserInputError(f"{directory} holds images generated with other settings ({details}); "
                             "use another --out, or delete that directory to start over")
    else:
      try:
        os.makedirs(directory, exist_ok=True)
        with open(path, "w") as f:
          json.dump({"settings": self.settings}, f, indent=1, sort_keys=True)
      except OSError as error:
        raise StorageError(f"cannot write {path}: {error}") from error

  def num_shards(self, num_images: int) -> int:
    return -(-num_images // self.shard_size)

  def bounds(self, shard: int, num_images: int) -> Tuple[int, int]:
    start = shard * self.shard_size
    return start, min(start + self.shard_size, num_images)

  def path(self, shard: int) -> str:
    return os.path.join(self.directory, f"shard_{shard:05d}.npz")

  def missing(self, num_images: int) -> List[int]:
    """Shards still to generate for the first `num_images` images (a last partial shard that is
    now too short counts as missing)."""
    out = []
    for k in range(self.num_shards(num_images)):
      start, stop = self.bounds(k, num_images)
      if not os.path.exists(self.path(k)) or self._count(k) < stop - start:
        out.append(k)
    return out

  def _count(self, shard: int) -> int:
    with np.load(self.path(shard)) as f:
      return len(f["indices"])

  def write(self, shard: int, images: np.ndarray, captions: Sequence[str]) -> None:
    start = shard * self.shard_size
    tmp = self.path(shard) + ".tmp.npz"
    try:
      np.savez(tmp, images=np.asarray(images, np.uint8),
               indices=np.arange(start, start + len(images)), captions=np.asarray(list(captions)))
      os.replace(tmp, self.path(shard))
    except OSError as error:
      raise StorageError(f"cannot write {self.path(shard)}: {error}") from error

  def read(self, shard: int, num_images: int, captions: Sequence[str]) -> np.ndarray:
    """The images of `shard` within the first `num_images`, checked against their captions."""
    start, stop = self.bounds(shard, num_images)
    with np.load(self.path(shard)) as f:
      images, stored = f["images"][:stop - start], [str(c) for c in f["captions"][:stop - start]]
    if stored != list(captions[start:stop]):
      raise InputFileError(f"{self.path(shard)} was generated for other captions; use another "
                           "--out, or delete it to generate it again")
    return images

  def iter_images(self, num_images: int, captions: Sequence[str]) -> Iterator[np.ndarray]:
    for k in range(self.num_shards(num_images)):
      yield self.read(k, num_images, captions)
