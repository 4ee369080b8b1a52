"""Improved precision and recall (Kynkaanniemi et al. 2019), k = 3 as in the paper.

Each set of features is a manifold estimate: the union of balls around its points, each ball's
radius the distance to that point's k-th nearest neighbour in the same set (the point itself not
counted). Precision is the share of generated points inside the real manifold (are the samples
realistic?), recall the share of real points inside the generated manifold (is the real variety
covered?).

Distances are computed in row blocks (`block` x N at a time, as the reference code's
`DistanceBlock` does), so 10k x 10k features need a few hundred MB, not N^2 at once.
"""

from typing import Dict

import numpy as np

from latent_diffusion_jax.core.errors import UserInputError

DEFAULT_K = 3
_BLOCK = 1024


def _squared_distances(a: np.ndarray, b: np.ndarray, b_norms: np.ndarray) -> np.ndarray:
  d = (a * a).sum(1)[:, None] - 2.0 * a @ b.T + b_norms[None, :]
  return np.maximum(d, 0.0)


def knn_radii(features: np.ndarray, k: int = DEFAULT_K, block: int = _BLOCK) -> np.ndarray:
  """Squared distance of each row to its k-th nearest other row, [N]."""
  features = np.asarray(features, np.float64)
  norms = (features * features).sum(1)
  radii = np.empty(len(features))
  for start in range(0, len(features), block):
    d = _squared_distances(features[start:start + block], features, norms)
    # Column k of the sorted row: column 0 is the point itself (distance 0).
    radii[start:start + block] = np.partition(d, k, axis=1)[:, k]
  return radii


def coverage(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray,
             block: int = _BLOCK) -> float:
  """Share of `queries` within `radii` (squared) of at least one row of `manifold`."""
  manifold = np.asarray(manifold, np.float64)
  queries = np.asarray(queries, np.float64)
  norms = (manifold * manifold).sum(1)
  inside = 0
  for start in range(0, len(queries), block):
    d = _squared_distances(queries[start:start + block], manifold, norms)
    inside += int(np.any(d <= radii[None, :], axis=1).sum())
  return inside / len(queries)


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int = DEFAULT_K,
                     block: int = _BLOCK) -> Dict[str, float]:
  """{"precision", "recall"} of generated [M, D] against real [N, D] features.

  Raises:
    UserInputError: feature sets that are not 2-D, differ in width, or have k or fewer rows.
  """
  real, generated = np.asarray(real), np.asarray(generated)
  if real.ndim != 2 or generated.ndim != 2:
    raise UserInputError(f"precision/recall features must be [N, D], got {real.shape} and "
                         f"{generated.shape}")
  if real.shape[1] != generated.shape[1]:
    raise UserInputError(f"feature widths differ: {real.shape[1]} (real) vs {generated.shape[1]} "
                         "(generated)")
  for name, x in (("real", real), ("generated", generated)):
    if len(x) <= k:
      raise UserInputError(f"precision/recall with k={k} needs more than {k} {name} images, "
                           f"got {len(x)}")
  real_radii = knn_radii(real, k, block)
  generated_radii = knn_radii(generated, k, block)
  return {"precision": coverage(real, real_radii, generated, block),
          "recall": coverage(generated, generated_radii, real, block)}
