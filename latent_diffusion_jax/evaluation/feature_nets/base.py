"""The shape every feature network of the metrics has: pure apply function + params, run sharded.

A feature network maps images to one vector each ("features": Inception pool3 for FID, CLIP image
embeddings, the shapes network's embedding) and, where it has a classifier head, to "logits" (the
Inception Score). `FeatureNet.extract` runs it jitted over a mesh: the batch is split over the data
axes, the params replicated; only the features come back to the host.
"""

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.core.parallel import BATCH_AXES, batch_sharding, create_mesh

# (params, images float32 [N, H, W, 3] in [0, 1]) -> {"features": [N, dim], optionally "logits"}.
ApplyFn = Callable[[Any, jax.Array], Dict[str, jax.Array]]


def check_images(images: np.ndarray, name: str = "images") -> np.ndarray:
  """uint8 [N, H, W, 3] (or float in [0, 1]) -> float32 in [0, 1]; anything else is a UserInputError."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise UserInputError(f"{name}: expected [N, H, W, 3] RGB images, got shape {images.shape}")
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  if not np.issubdtype(images.dtype, np.floating):
    raise UserInputError(f"{name}: expected uint8 or float images, got {images.dtype}")
  lo, hi = float(images.min(initial=0.0)), float(images.max(initial=0.0))
  if lo < -1e-3 or hi > 1 + 1e-3:
    raise UserInputError(f"{name}: float images must lie in [0, 1], found values in [{lo:.3g}, {hi:.3g}]")
  return np.clip(images, 0.0, 1.0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class FeatureNet:
  """name: what reports call it; dim: width of "features"; apply_fn and params: the network."""
  name: str
  dim: int
  apply_fn: ApplyFn
  params: Any = dataclasses.field(repr=False)

  def extract(self, images: np.ndarray, *, batch_size: int = 50,
              mesh: Optional[Mesh] = None) -> Dict[str, np.ndarray]:
    """Features of `images` (uint8 or [0, 1] float, [N, H, W, 3]) as float64 host arrays."""
    return run_sharded(self.apply_fn, self.params, check_images(images), batch_size=batch_size,
                       mesh=mesh)


def run_sharded(apply_fn: Callable[[Any, jax.Array], Dict[str, jax.Array]], params: Any,
                inputs: np.ndarray, *, batch_size: int = 50,
                mesh: Optional[Mesh] = None) -> Dict[str, np.ndarray]:
  """`apply_fn(params, batch)` jitted over `inputs` in batches split over the mesh's data axes.

  The params are replicated; each batch is `batch_size` (or all inputs, if fewer) rounded up to
  whole shards, the last one zero-padded (the padding's outputs are dropped). Outputs come back as float64 host arrays.
  """
  mesh = mesh or create_mesh((-1, 1, 1))
  shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
  # One compiled shape: batches of `step`, never more than the inputs need.
  step = max(shards, -(-min(batch_size, len(inputs)) // shards) * shards)
  params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  fn = _jitted(apply_fn, mesh)
  outputs: Dict[str, list] = {}
  for start in range(0, len(inputs), step):
    chunk = inputs[start:start + step]
    n = len(chunk)
    if n < step:  # pad to a whole number of shards; the padding is dropped below
      chunk = np.concatenate([chunk, np.zeros((step - n,) + chunk.shape[1:], chunk.dtype)])
    out = fn(params, jax.device_put(chunk, batch_sharding(mesh, chunk.ndim)))
    for key, value in out.items():
      outputs.setdefault(key, []).append(np.asarray(jax.device_get(value), np.float64)[:n])
  return {k: np.concatenate(v) for k, v in outputs.items()}


@functools.lru_cache(maxsize=16)
def _jitted(apply_fn: ApplyFn, mesh: Mesh):
  return jax.jit(apply_fn, out_shardings=NamedSharding(mesh, PartitionSpec()))
