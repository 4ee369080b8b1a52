"""Writing sampled images: one PNG per image, a near-square grid and a settings.json beside them.

  saved = save_images(images, "/tmp/out", prompts, {"seed": 0, "sampler": "ddim", ...})
  saved.images  # ['/tmp/out/0000-a-red-circle.png', ...]; saved.grid, saved.settings likewise
"""

import json
import math
import os
import re
from typing import Any, Dict, List, NamedTuple, Sequence

import numpy as np
from PIL import Image
from latent_diffusion_jax.core.errors import UserInputError

_SLUG_MAX_CHARS = 48


class SavedImages(NamedTuple):
  """Paths written by `save_images`."""
  images: List[str]
  grid: str
  settings: str


def slugify(text: str, max_chars: int = _SLUG_MAX_CHARS) -> str:
  """A file-name-safe, lowercase form of `text` ("A red circle!" -> "a-red-circle")."""
  slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
  return slug[:max_chars].rstrip("-") or "image"


def make_grid(images: np.ndarray, ncols: int | None = None, padding: int = 2,
              pad_value: int = 255) -> np.ndarray:
  """Tiles images into one near-square grid, row by row.

  Args:
    images: uint8 [N, H, W, C], N >= 1.
    ncols: images per row; default ceil(sqrt(N)), so the grid is about square.
    padding: pixels between tiles and around the border.
    pad_value: the colour of the padding (white by default).

  Returns:
    uint8 [rows * (H + padding) + padding, ncols * (W + padding) + padding, C]; cells past N
    are left as padding colour.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] < 1:
    raise UserInputError(f"make_grid expects images [N, H, W, C] with N >= 1, got {images.shape}.")
  n, h, w, c = images.shape
  ncols = max(1, min(ncols or math.ceil(math.sqrt(n)), n))
  nrows = math.ceil(n / ncols)
  grid = np.full((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c), pad_value,
                 images.dtype)
  for i, image in enumerate(images):
    top = padding + (i // ncols) * (h + padding)
    left = padding + (i % ncols) * (w + padding)
    grid[top:top + h, left:left + w] = image
  return grid


def _to_pil(image: np.ndarray) -> Image.Image:
  if image.dtype != np.uint8:
    raise UserInputError(f"Images must be uint8 to be written as PNG, got {image.dtype}.")
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def save_images(images: np.ndarray, out_dir: str, prompts: Sequence[str],
                settings: Dict[str, Any]) -> SavedImages:
  """Writes `NNNN-<prompt slug>.png` per image, `grid.png` and `settings.json` into `out_dir`.

  Args:
    images: uint8 [N, H, W, 3] (or 1 channel), as `sampling.generate` returns them.
    out_dir: the output directory (created if missing; files of the same name are replaced).
    prompts: one prompt per image, used in the file names and recorded in settings.json.
    settings: JSON-serializable generation settings (seed, sampler, steps, guidance, eta,
      negative prompt, source, ...); written as given, plus "prompts", "files" and "grid".

  Returns:
    The paths written.
  """
  images = np.asarray(images)
  prompts = list(prompts)
  if images.ndim != 4 or len(prompts) != images.shape[0]:
    raise UserInputError(f"save_images needs images [N, H, W, C] and N prompts; got images "
                     f"{images.shape} and {len(prompts)} prompts.")
  os.makedirs(out_dir, exist_ok=True)
  digits = max(4, len(str(len(prompts) - 1)))
  names = [f"{i:0{digits}d}-{slugify(p)}.png" for i, p in enumerate(prompts)]
  for name, image in zip(names, images):
    _to_pil(image).save(os.path.join(out_dir, name))
  grid_path = os.path.join(out_dir, "grid.png")
  _to_pil(make_grid(images)).save(grid_path)

  record = {**settings, "prompts": prompts, "files": names, "grid": "grid.png"}
  settings_path = os.path.join(out_dir, "settings.json")
  with open(settings_path, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2, ensure_ascii=False)
    f.write("\n")
  return SavedImages([os.path.join(out_dir, n) for n in names], grid_path, settings_path)
