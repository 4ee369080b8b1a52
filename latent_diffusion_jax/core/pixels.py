"""Pixel value conventions in one place: uint8 [0, 255] on disk, float [-1, 1] in the networks.

The float <-> uint8 rounding follows diffusers' `numpy_to_pil`, so images written from the same
pixels are byte-identical across the two implementations.
"""

import jax.numpy as jnp
import numpy as np


def to_float(images) -> jnp.ndarray:
  """uint8 [0, 255] (or float already in [-1, 1]) -> float32 [-1, 1]; traceable."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 127.5 - 1.0
  return images.astype(jnp.float32)


def to_unit(images) -> np.ndarray:
  """float [-1, 1] -> float32 [0, 1] on the host, clipped."""
  return np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0.0, 1.0).astype(np.float32)


def to_uint8(images) -> np.ndarray:
  """float [-1, 1] -> uint8 [0, 255] on the host (clipped, rounded to nearest)."""
  return np.round(to_unit(images) * 255).astype(np.uint8)
