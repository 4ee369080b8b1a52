"""Segmentation maps of the embedded shapes: class 0 background, 1 + the shape's index in
`shapes.SHAPES` (circle 1, square 2, triangle 3) where the shape covers at least half a pixel.

The mask is the generator's own geometry (`shapes.coverage`, read back from the rendered pixels
by `control.shape_mask`), so the map matches what the image shows.
"""

import numpy as np

from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.data import shapes
from latent_diffusion_jax.data.control import shape_mask

NUM_CLASSES = 1 + len(shapes.SHAPES)


def shapes_segmentation(images: np.ndarray, shape_names) -> np.ndarray:
  """uint8 class ids [N, H, W] of shapes images [N, H, W, 3] with their shape names [N]."""
  ids = np.asarray([1 + shapes.SHAPES.index(str(name)) for name in shape_names], np.uint8)
  return shape_mask(images).astype(np.uint8) * ids[:, None, None]


def check_classes(labels: np.ndarray, num_classes: int, what: str = "the segmentation maps"
                  ) -> None:
  """Raises UserInputError when a class id lies outside [0, num_classes)."""
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise UserInputError(
        f"{what} hold class ids in [{labels.min()}, {labels.max()}], but "
        f"model.image_conditioning.num_classes={num_classes} allows [0, {num_classes}); the "
        f"shapes data has {NUM_CLASSES} classes (background + {len(shapes.SHAPES)} shapes).")
