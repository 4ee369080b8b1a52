"""Control images for ControlNet training: hints computed from the embedded shapes, caption edits.

`data.control` picks the hint the shapes pipeline computes from each image's shape:
  "segmentation"  the shape's filled mask (white shape on black), the segmentation map of the
                  single foreground class
  "outline"       its one-pixel boundary (mask pixels with a background 4-neighbour), the
                  shapes analogue of the canny edges ControlNet is often trained on
Shapes sit on a black background, so a pixel's share of the shape is its brightness over the
shape color's: the mask read from the pixels is the generator's own coverage (`shapes.coverage`),
thresholded at half. Hints are float in [0, 1], [N, H, W, C] with the C channels equal (diffusers'
convention for control images, whose ControlNets take 3 channels).

`drop_position` turns "a red circle in the top left" into "a red circle", so the control map is
the only place the position comes from.
"""

import re
from typing import Sequence

import numpy as np

from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.data import shapes

CONTROL_KINDS = ("outline", "segmentation")
_POSITION = re.compile(r"\s+in the (?:" + "|".join(shapes.POSITIONS) + r")\b")


def shape_mask(images: np.ndarray) -> np.ndarray:
  """bool [N, H, W]: pixels at least half covered by the shape of uint8 shapes images [N, H, W, 3].

  The brightest channel of a pixel is its coverage times the shape color's brightest channel
  (the background is black), so comparing with half the dimmest palette maximum splits at half
  coverage for every color within a level of rounding.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise UserInputError(f"Expected images [N, H, W, 3], got shape {images.shape}.")
  brightest = shapes.palette_array().max(axis=1)
  peak = images.max(axis=-1).astype(np.float32)
  # Per image, the shape's own color maximum (its brightest pixel, fully covered inside the shape).
  full = np.maximum(peak.reshape(len(images), -1).max(axis=1), brightest.min())
  return peak >= 0.5 * full[:, None, None]


def outline(mask: np.ndarray) -> np.ndarray:
  """bool [N, H, W]: mask pixels with a 4-neighbour outside the mask (the image border counts as
  outside)."""
  padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)), constant_values=False)
  inner = (padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:])
  return mask & ~inner


def control_hint(images: np.ndarray, kind: str, channels: int = 3,
                 dtype=np.float16) -> np.ndarray:
  """The `kind` hint of shapes images: [N, H, W, channels] in {0, 1} as `dtype`.

  Args:
    images: uint8 [N, H, W, 3] shapes images.
    kind: one of CONTROL_KINDS.
    channels: the ControlNet's conditioning channels (model.controlnet.conditioning_channels).
    dtype: float16 keeps a 20000-image training set at 120 MB; the step casts it.
  """
  if kind not in CONTROL_KINDS:
    raise UserInputError(f"Unknown data.control {kind!r}; valid: '', {', '.join(CONTROL_KINDS)}.")
  mask = shape_mask(images)
  hint = outline(mask) if kind == "outline" else mask
  return np.repeat(hint[..., None].astype(dtype), channels, axis=-1)


def hint_from_coverage(coverage: np.ndarray, kind: str, channels: int = 3) -> np.ndarray:
  """The hint of one layout drawn from the generator's geometry (`shapes.coverage` [H, W]):
  [H, W, channels] float32, equal to `control_hint` of its rendered image."""
  if kind not in CONTROL_KINDS:
    raise UserInputError(f"Unknown control kind {kind!r}; valid: {', '.join(CONTROL_KINDS)}.")
  mask = (np.asarray(coverage) >= 0.5)[None]
  hint = (outline(mask) if kind == "outline" else mask)[0]
  return np.repeat(hint[..., None].astype(np.float32), channels, axis=-1)


def drop_position(captions: Sequence[str]) -> list:
  """Captions without their position phrase: "a red circle in the top left" -> "a red circle"."""
  return [_POSITION.sub("", c) for c in captions]
