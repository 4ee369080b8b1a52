"""Caption fidelity on the shapes dataset: does a generated image show what its caption asks for?

`detect` reads color, position and shape back from pixels with fixed rules, no learned model, so
the score is deterministic and cheap (under 1 ms per 32x32 image on one CPU core):

  foreground  pixels whose RGB distance from the black background exceeds a third of the dimmest
              palette color's; only the largest 8-connected blob counts, so specks do not
  color       the palette color whose direction in RGB is nearest to the mean of the blob's bright
              core; comparing directions, not values, forgives dim or washed-out generations
  position    the 2x2 grid cell holding the blob's intensity-weighted centroid
  shape       from the blob's soft occupancy projected onto the rows and onto the columns: a
              triangle (apex up) has its mass skewed to the bottom rows; a square's projections
              are flat (excess kurtosis -1.2) and a circle's are rounder (-1.0)

The shape features are cumulants because a Gaussian blur adds its own cumulants to an image's,
and those of order 3 and 4 are zero: the third cumulant and kappa4 / area^2 survive blur, where a
bounding-box fill ratio (circle 0.785, square 1, triangle 0.5) does not.

Images without foreground detect as "none" for every attribute, which always counts as wrong.
`detect_all` describes every blob of an image of several shapes (the layout evaluator's input).
"""

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from latent_diffusion_jax.data import shapes
from latent_diffusion_jax.core.errors import UserInputError

NONE = "none"
ATTRIBUTES = ("color", "position", "shape")

# A third of the way from the background to the dimmest palette color: far above Gaussian noise
# of sigma 0.05 (about 22 in RGB distance) and below blurred edges of small shapes.
_FOREGROUND_FRACTION = 0.33
# Core pixels, which give the color and the full-occupancy intensity, reach this share of the
# blob's brightest pixel.
_CORE_FRACTION = 0.7
# Rings of pixels around the blob whose occupancy still counts: blurred edges fade out there.
_EDGE_RINGS = 2
# Occupancy starts this many standard deviations above the mean background distance, so noise
# around the blob adds no mass (noise far out would swamp the fourth moments).
_NOISE_SIGMAS = 3.0
# Row-projection skewness of an apex-up triangle is -0.57 (-0.3 after strong blur); circles and
# squares are symmetric.
_TRIANGLE_SKEW_BELOW = -0.2
# kappa4 / area^2 of a projection: square -1/120, circle -1/(16 pi^2); the boundary is their
# geometric mean.
_SQUARE_KAPPA4_BELOW = -7.26e-3

_PALETTE_NAMES = tuple(shapes.COLORS)
_BACKGROUND = np.asarray(shapes.BACKGROUND, np.float32)
_PALETTE = shapes.palette_array(_PALETTE_NAMES) - _BACKGROUND
_PALETTE_DIRECTIONS = _PALETTE / np.linalg.norm(_PALETTE, axis=1, keepdims=True)
_THRESHOLD = _FOREGROUND_FRACTION * float(np.min(np.linalg.norm(_PALETTE, axis=1)))
_CONNECTIVITY = np.ones((3, 3), bool)


def detect(image: np.ndarray) -> Dict[str, str]:
  """Reads the caption attributes of one shapes image from its pixels.

  Args:
    image: [H, W, 3] uint8 in [0, 255], or float in [0, 1] (values outside are clipped).

  Returns:
    {"color": ..., "position": ..., "shape": ...} with names from `shapes.COLORS`,
    `shapes.POSITIONS` and `shapes.SHAPES`, or "none" for all three without foreground.
  """
  offsets = _to_float255(image) - _BACKGROUND
  distance = np.linalg.norm(offsets, axis=-1)
  blob = _largest_blob(distance > _THRESHOLD)
  if blob is None:
    return {name: NONE for name in ATTRIBUTES}
  described = _describe(offsets, distance, blob)
  return {name: described[name] for name in ATTRIBUTES}


def detect_all(image: np.ndarray, min_pixels: int = 4) -> List[Dict[str, Any]]:
  """Reads every shape of an image of several: each 8-connected foreground blob of at least
  `min_pixels` pixels, described as `detect` describes the largest one.

  Args:
    image: [H, W, 3] uint8 in [0, 255], or float in [0, 1].
    min_pixels: smaller blobs are specks, not shapes.

  Returns:
    One dict per blob, largest first: "color", "shape", "position" as in `detect`, "center"
    (x, y) of its intensity-weighted centroid in image fractions (x right, y down) and "pixels".
  """
  offsets = _to_float255(image) - _BACKGROUND
  distance = np.linalg.norm(offsets, axis=-1)
  labels, count = ndimage.label(distance > _THRESHOLD, structure=_CONNECTIVITY)
  sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
  found = []
  for k in np.argsort(-sizes, kind="stable"):
    if sizes[k] < min_pixels:
      break
    blob = labels == k + 1
    with np.errstate(divide="ignore", invalid="ignore"):  # a one-row speck has no skewness
      described = _describe(offsets, distance, blob, others=(labels > 0) & ~blob)
    found.append(dict(described, pixels=int(sizes[k])))
  return found


def _describe(offsets: np.ndarray, distance: np.ndarray, blob: np.ndarray,
              others: Optional[np.ndarray] = None) -> Dict[str, Any]:
  """Color, position, shape and center of one blob; `others` (other shapes' pixels) are left out
  of the background statistics."""
  core = blob & (distance >= _CORE_FRACTION * distance[blob].max())
  mean_offset = offsets[core].mean(axis=0)
  color = _PALETTE_NAMES[int(np.argmax(_PALETTE_DIRECTIONS @ mean_offset))]

  occupancy = _occupancy(distance, blob, full=float(np.median(distance[core])), others=others)
  row_mass, col_mass = occupancy.sum(axis=1), occupancy.sum(axis=0)
  rows = _cumulants(row_mass)
  cols = _cumulants(col_mass)
  height, width = occupancy.shape
  # Cumulants index pixel centers, which sit half a pixel past the pixel's top-left corner.
  row, col = int(rows[0] + 0.5 >= height / 2), int(cols[0] + 0.5 >= width / 2)
  position = shapes.POSITIONS[2 * row + col]

  area = occupancy.sum()
  skew = rows[2] / rows[1] ** 1.5
  kappa4 = (rows[3] + cols[3]) / (2 * area ** 2)
  if skew < _TRIANGLE_SKEW_BELOW:
    shape = "triangle"
  elif kappa4 < _SQUARE_KAPPA4_BELOW:
    shape = "square"
  else:
    shape = "circle"
  center = ((cols[0] + 0.5) / width, (rows[0] + 0.5) / height)
  return {"color": color, "position": position, "shape": shape, "center": center}


def caption_fidelity(images: np.ndarray | Sequence[np.ndarray],
                     attributes: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
  """Scores generated images against the attributes of the captions they were sampled from.

  Args:
    images: [N, H, W, 3] (or a sequence of [H, W, 3]) uint8 in [0, 255] or float in [0, 1].
    attributes: N mappings with at least "color", "position" and "shape" (as produced by
      `shapes.sample_attributes` or decoded from the TFDS features).

  Returns:
    A dict with accuracies in [0, 1] for "color", "position", "color_and_position", "shape" and
    "all" (all three right), "num_examples", and "per_example": a list of dicts holding the
    "expected" and "detected" attributes and a bool for each accuracy key.
  """
  if len(images) != len(attributes):
    raise UserInputError(f"Got {len(images)} images but {len(attributes)} attribute sets")
  per_example = []
  for image, expected in zip(images, attributes):
    detected = detect(np.asarray(image))
    right = {name: detected[name] == expected[name] for name in ATTRIBUTES}
    right["color_and_position"] = right["color"] and right["position"]
    right["all"] = all(right[name] for name in ATTRIBUTES)
    per_example.append({"expected": {name: expected[name] for name in ATTRIBUTES},
                        "detected": detected, **right})
  count = len(per_example)
  keys = ("color", "position", "color_and_position", "shape", "all")
  scores = {key: sum(e[key] for e in per_example) / count if count else 0.0 for key in keys}
  return {**scores, "num_examples": count, "per_example": per_example}


def _largest_blob(mask: np.ndarray) -> np.ndarray | None:
  labels, count = ndimage.label(mask, structure=_CONNECTIVITY)
  if count == 0:
    return None
  sizes = np.bincount(labels.ravel())[1:]
  return labels == 1 + int(np.argmax(sizes))


def _occupancy(distance: np.ndarray, blob: np.ndarray, full: float,
               others: Optional[np.ndarray] = None) -> np.ndarray:
  """Per-pixel share of the shape in [0, 1], zero outside the blob and its edge rings."""
  near = ndimage.binary_dilation(blob, structure=_CONNECTIVITY, iterations=_EDGE_RINGS)
  if others is not None and others.any():
    near_others = ndimage.binary_dilation(others, structure=_CONNECTIVITY,
                                          iterations=_EDGE_RINGS)
    background = distance[~near & ~near_others]
    near = near & ~others
  else:
    background = distance[~near]
  floor = background.mean() + _NOISE_SIGMAS * background.std() if background.size else 0.0
  floor = min(floor, 0.5 * full)
  return np.where(near, np.clip((distance - floor) / (full - floor), 0.0, 1.0), 0.0)


def _cumulants(mass: np.ndarray) -> Tuple[float, float, float, float]:
  """Mean, variance, third and fourth cumulant of the distribution proportional to `mass`."""
  index = np.arange(mass.size)
  p = mass / mass.sum()
  mean = p @ index
  centered = index - mean
  variance = p @ centered ** 2
  return (float(mean), float(variance), float(p @ centered ** 3),
          float(p @ centered ** 4 - 3 * variance ** 2))


def _to_float255(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise UserInputError(f"Expected an [H, W, 3] image, got shape {image.shape}")
  if np.issubdtype(image.dtype, np.integer):
    return image.astype(np.float32)
  return np.clip(image.astype(np.float32), 0.0, 1.0) * 255.0
