"""Low-resolution images for super-resolution training: the image `factor` times smaller.

`method` is the degradation: "area" (the mean of each factor x factor cell, a box filter),
"bilinear" or "bicubic" (anti-aliased resampling, like PIL's resize the SD x4 upscaler's data
used). Results are uint8, as a stored low-res image would be.
"""

import numpy as np

from latent_diffusion_jax.core.errors import UserInputError

METHODS = ("area", "bilinear", "bicubic")
_CHUNK = 1024


def check_factor(image_size: int, factor: int, what: str = "model.image_size") -> None:
  """Raises UserInputError unless `factor` >= 1 divides `image_size`."""
  if factor < 1 or image_size % factor:
    raise UserInputError(f"The low-res factor {factor} does not divide {what}={image_size}: "
                         "low-res images must have a whole number of pixels per side.")


def degrade(images: np.ndarray, factor: int, method: str = "bicubic") -> np.ndarray:
  """uint8 images [N, H, W, 3] -> uint8 [N, H / factor, W / factor, 3].

  Raises:
    UserInputError: an unknown method, or a factor that does not divide both sides.
  """
  if method not in METHODS:
    raise UserInputError(f"Unknown degradation {method!r}; valid: {', '.join(METHODS)}.")
  images = np.asarray(images)
  if images.ndim != 4:
    raise UserInputError(f"Expected images [N, H, W, C], got shape {images.shape}.")
  n, h, w, c = images.shape
  check_factor(h, factor, "the image height")
  check_factor(w, factor, "the image width")
  if method == "area":
    cells = images.astype(np.float32).reshape(n, h // factor, factor, w // factor, factor, c)
    out = cells.mean(axis=(2, 4))
  else:
    import jax
    out = np.concatenate([np.asarray(jax.image.resize(
        images[i:i + _CHUNK].astype(np.float32), (len(images[i:i + _CHUNK]), h // factor,
                                                  w // factor, c), method, antialias=True))
        for i in range(0, n, _CHUNK)] or [np.zeros((0, h // factor, w // factor, c), np.float32)])
  return np.clip(np.round(out), 0, 255).astype(np.uint8)
