"""Segmentation maps of the embedded shapes: class 0 is the background, and the shape's pixels
(those it covers at least half) hold its class by `scheme`:

  "shape"        1 + the shape's index in `shapes.SHAPES` (circle 1, square 2, triangle 3)
  "color"        1 + the color's index in `shapes.COLORS` (red 1 .. cyan 6)
  "color_shape"  1 + color index * 3 + shape index (18 classes + background): the map alone
                 fixes what the image shows, as in the LDM paper's semantic synthesis

The mask is the generator's own geometry (`shapes.coverage`, read back from the rendered pixels
by `control.shape_mask`), so the map matches what the image shows.
"""

from typing import Sequence

import numpy as np

from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.data import shapes
from latent_diffusion_jax.data.control import shape_mask

SCHEMES = {"shape": 1 + len(shapes.SHAPES), "color": 1 + len(shapes.COLORS),
           "color_shape": 1 + len(shapes.COLORS) * len(shapes.SHAPES)}


def num_classes(scheme: str) -> int:
  """Classes of a scheme, background included."""
  if scheme not in SCHEMES:
    raise UserInputError(f"Unknown segmentation scheme {scheme!r}; valid: {', '.join(SCHEMES)}.")
  return SCHEMES[scheme]


def class_id(color: str, shape: str, scheme: str) -> int:
  """The class of a shape's pixels (never 0, the background)."""
  num_classes(scheme)
  c, s = list(shapes.COLORS).index(str(color)), shapes.SHAPES.index(str(shape))
  return 1 + {"shape": s, "color": c, "color_shape": c * len(shapes.SHAPES) + s}[scheme]


def shapes_segmentation(images: np.ndarray, colors: Sequence[str], shape_names: Sequence[str],
                        scheme: str = "shape") -> np.ndarray:
  """uint8 class ids [N, H, W] of shapes images [N, H, W, 3] with their colors and shapes [N]."""
  ids = np.asarray([class_id(c, s, scheme) for c, s in zip(colors, shape_names)], np.uint8)
  return shape_mask(images).astype(np.uint8) * ids[:, None, None]


def check_classes(labels: np.ndarray, num: int, what: str = "the segmentation maps") -> None:
  """Raises UserInputError when a class id lies outside [0, num)."""
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= num):
    raise UserInputError(
        f"{what} hold class ids in [{labels.min()}, {labels.max()}], but "
        f"model.image_conditioning.num_classes={num} allows [0, {num}); the shapes schemes have "
        + ", ".join(f"{k}: {v}" for k, v in SCHEMES.items()) + " classes.")
