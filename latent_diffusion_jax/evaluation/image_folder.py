"""Images read from a folder (reference images, or images another system generated), in sorted
file-name order, in batches so that a large folder never sits in memory at once."""

import os
from typing import Iterator, List, Optional, Sequence

import numpy as np
from PIL import Image

from latent_diffusion_jax.core.errors import InputFileError, MissingInputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(directory: str, flag: str = "images") -> List[str]:
  """Sorted paths of the image files directly in `directory` (grids named grid.png skipped)."""
  if not directory or not os.path.isdir(directory):
    raise MissingInputError(f"--{flag}: image folder {directory!r} does not exist")
  names = sorted(n for n in os.listdir(directory)
                 if n.lower().endswith(IMAGE_EXTENSIONS) and n != "grid.png")
  if not names:
    raise InputFileError(f"--{flag}: {directory} holds no image file "
                         f"({', '.join(IMAGE_EXTENSIONS)})")
  return [os.path.join(directory, n) for n in names]


def read_image(path: str) -> np.ndarray:
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"), np.uint8)
  except OSError as error:
    raise InputFileError(f"cannot read image {path}: {error}") from error


def iter_batches(paths: Sequence[str], batch_size: int = 256,
                 size: Optional[tuple] = None) -> Iterator[np.ndarray]:
  """uint8 [k, H, W, 3] batches of the images at `paths`; all must share one size (the first's,
  or `size`), else an InputFileError names the file."""
  for start in range(0, len(paths), batch_size):
    batch = []
    for path in paths[start:start + batch_size]:
      image = read_image(path)
      size = size or image.shape[:2]
      if image.shape[:2] != tuple(size):
        raise InputFileError(f"{path} is {image.shape[1]}x{image.shape[0]} but the images before "
                             f"it are {size[1]}x{size[0]}: resize them all to one size")
      batch.append(image)
    yield np.stack(batch)
