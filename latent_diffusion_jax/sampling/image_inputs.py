"""sample.py's image inputs (--init_image, --mask_image, --low_res_image, --semantic_map) read from
files into the arrays `image_conditioned.generate_from_images` takes."""

import dataclasses
import os
from typing import Any, Dict, Optional

import numpy as np

from latent_diffusion_jax.core.errors import InputFileError, MissingInputError


@dataclasses.dataclass(frozen=True)
class ImageInputs:
  """Image files conditioning every sampled image, and their settings.

  Attributes:
    init_image: an RGB image to start from (image-to-image) or to inpaint.
    mask_image: with init_image: a single-channel (grayscale) mask, white = repaint.
    strength: image-to-image / inpainting strength in (0, 1].
    low_res_image: an RGB image to upscale.
    noise_level: the low-res image's noise level (upscaling).
    semantic_map: a single-channel image of class ids (semantic models).
    keep_unmasked: inpainting: pixels outside the mask are init_image's exactly.
  """
  init_image: Optional[str] = None
  mask_image: Optional[str] = None
  strength: float = 1.0
  low_res_image: Optional[str] = None
  noise_level: int = 20
  semantic_map: Optional[str] = None
  keep_unmasked: bool = False

  @property
  def given(self) -> bool:
    return any(p is not None for p in (self.init_image, self.mask_image, self.low_res_image,
                                       self.semantic_map))

  def arrays(self) -> Dict[str, Any]:
    """Keyword arguments of `generate_from_images`: each given file read as a batch of one."""
    out: Dict[str, Any] = {"strength": self.strength}
    if self.init_image is not None:
      out["init_image"] = _read(self.init_image, "init_image", "RGB")[None]
    if self.mask_image is not None:
      out["mask_image"] = _read(self.mask_image, "mask_image", None)[None]
    if self.low_res_image is not None:
      out["low_res_image"] = _read(self.low_res_image, "low_res_image", "RGB")[None]
      out["noise_level"] = self.noise_level
    if self.semantic_map is not None:
      out["semantic_map"] = _read(self.semantic_map, "semantic_map", None)[None].astype(np.int32)
    if self.keep_unmasked:
      out["keep_unmasked"] = True
    return out

  def settings(self) -> Dict[str, Any]:
    """The entries settings.json records."""
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _read(path: str, name: str, mode: Optional[str]) -> np.ndarray:
  """The image at `path` as uint8 [H, W, 3] (mode "RGB") or its single channel [H, W] (masks
  and maps; grayscale or palette images, which keep their indices)."""
  from PIL import Image, UnidentifiedImageError
  if not os.path.isfile(path):
    raise MissingInputError(f"--{name} {path!r}: no such file.")
  try:
    with Image.open(path) as image:
      if mode is not None:
        return np.asarray(image.convert(mode))
      arr = np.asarray(image)
  except (UnidentifiedImageError, OSError) as e:
    raise InputFileError(f"--{name} {path!r} is not a readable image: {e}") from e
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if arr.ndim != 2:
    raise InputFileError(f"--{name} {path!r} has {arr.shape[-1]} channels; it must be a "
                         "single-channel (grayscale) image.")
  return arr
