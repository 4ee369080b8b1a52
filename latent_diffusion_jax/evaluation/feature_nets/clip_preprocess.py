"""CLIP's image preprocessing in JAX, equal to PIL's: shortest side to the model size (bicubic),
center crop, rescale to [0, 1], normalize with CLIP's mean and std.

Which reference it matches: the PIL pipeline that OpenAI's CLIP, open_clip's `image_transform`
(torchvision transforms on PIL images, as MLPerf scores) and transformers' `CLIPImageProcessorPil`
(`CLIPImageProcessor` before transformers 5) all run. PIL resizes 8-bit images in two passes,
horizontal then vertical, each with its antialiased bicubic filter (a = -0.5, support scaled by the
downscale factor), coefficients in 22-bit fixed point, and the result of each pass rounded and
clipped to uint8. The same arithmetic is done here exactly: the fixed-point coefficients are split
into a high and a low part so that both float32 matrix products stay below 2**24 and are exact, and
the integer sum is rounded as PIL rounds it. On uint8 input the resized pixels are PIL's bit for bit
(tests/test_clip_score.py), so the normalized pixels agree to float32 rounding (<= 1e-6).

Where the references differ from each other:
  * center crop offset when the excess is odd: transformers takes floor((h - 224) / 2), torchvision's
    CenterCrop (open_clip) Python's round-half-even of (h - 224) / 2, one pixel apart when the
    excess is 3 mod 4 (`crop_rounding`).
  * transformers 5's default `CLIPImageProcessor` resizes uint8 tensors with torch's antialiased
    bicubic instead of PIL; its pixels differ from PIL's by a few levels on some pixels (measured
    in the tests). torch's bicubic on float tensors (a = -0.75, no antialias unless asked) differs
    more; neither is what the published CLIP numbers used.

Float images are first quantized to uint8 (round(x * 255)), as they would be when saved to PNG
before scoring.
"""

import functools
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion_jax.core.errors import UserInputError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP_ROUNDINGS = ("floor", "half_even")

_PRECISION_BITS = 22  # PIL's fixed-point precision for 8-bit images: 32 - 8 - 2
_EXACT = 2 ** 24      # float32 holds every integer below this exactly


def _bicubic(x: np.ndarray) -> np.ndarray:
  """PIL's bicubic kernel, a = -0.5."""
  a = -0.5
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def pil_bicubic_coefficients(in_size: int, out_size: int) -> np.ndarray:
  """PIL's fixed-point resampling matrix [out_size, in_size] (int64, units of 2**-22).

  As Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` compute it: the kernel is stretched
  by the downscale factor (antialiasing), each output pixel's taps are normalized to sum to one,
  then rounded half away from zero to 22 fractional bits.
  """
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support = 2.0 * filterscale
  inverse = 1.0 / filterscale
  weights = np.zeros((out_size, in_size), np.float64)
  for xx in range(out_size):
    center = (xx + 0.5) * scale
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    taps = _bicubic((np.arange(lo, hi) - center + 0.5) * inverse)
    total = taps.sum()
    weights[xx, lo:hi] = taps / total if total != 0.0 else taps
  unit = float(1 << _PRECISION_BITS)
  return np.where(weights < 0, np.trunc(-0.5 + weights * unit),
                  np.trunc(0.5 + weights * unit)).astype(np.int64)


def resize_output_size(height: int, width: int, shortest: int) -> Tuple[int, int]:
  """Size after resizing the shortest side to `shortest`, as transformers and torchvision compute
  it (the long side truncated, not rounded)."""
  if height <= width:
    return shortest, int(shortest * width / height)
  return int(shortest * height / width), shortest


def crop_offset(size: int, crop: int, rounding: str) -> int:
  if rounding == "floor":
    return (size - crop) // 2
  return int(round((size - crop) / 2.0))


def _low_bits(coefficients: np.ndarray) -> int:
  """The split point s of each coefficient k = hi * 2**s + lo (|lo| <= 2**(s-1)) that keeps both
  uint8-weighted sums exact in float32."""
  taps = int((coefficients != 0).sum(axis=1).max())
  for s in range(_PRECISION_BITS, -1, -1):
    hi = np.round(coefficients / 2 ** s)
    lo_bound = 255 * taps * 2 ** max(s - 1, 0)
    hi_bound = 255 * np.abs(hi).sum(axis=1).max()
    if lo_bound < _EXACT and hi_bound < _EXACT:
      return s
  raise UserInputError(f"An image side of {coefficients.shape[1]} pixels is too large to resize "
                       f"exactly to {coefficients.shape[0]}; downscale it first.")


def _resample_axis(pixels: jnp.ndarray, coefficients: np.ndarray, axis: int) -> jnp.ndarray:
  """One PIL pass along `axis` of integer-valued float32 pixels -> rounded, clipped uint8 levels."""
  s = _low_bits(coefficients)
  hi = np.round(coefficients / 2 ** s)
  lo = coefficients - hi * 2 ** s
  spec = "nhwc,oh->nowc" if axis == 1 else "nhwc,ow->nhoc"
  dot = functools.partial(jnp.einsum, spec, precision=jax.lax.Precision.HIGHEST)
  high = dot(pixels, jnp.asarray(hi, jnp.float32)).astype(jnp.int32)
  low = dot(pixels, jnp.asarray(lo, jnp.float32)).astype(jnp.int32)
  total = high * (2 ** s) + low + (1 << (_PRECISION_BITS - 1))
  return jnp.clip(jnp.right_shift(total, _PRECISION_BITS), 0, 255).astype(jnp.float32)


def clip_preprocess(images: jnp.ndarray, image_size: int, *,
                    mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
                    crop_rounding: str = "floor") -> jnp.ndarray:
  """Images -> CLIP's normalized input, jittable (sizes are static).

  Args:
    images: [N, H, W, 3] float in [0, 1] (quantized to uint8 levels first) or uint8.
    image_size: the model's input size; the shortest side is resized to it, then the center
      `image_size` x `image_size` is cropped.
    mean: per-channel mean subtracted after rescaling to [0, 1].
    std: per-channel standard deviation divided by.
    crop_rounding: "floor" (transformers) or "half_even" (torchvision's CenterCrop, open_clip).

  Returns:
    float32 [N, image_size, image_size, 3].
  """
  if crop_rounding not in CROP_ROUNDINGS:
    raise UserInputError(f"crop_rounding must be one of {CROP_ROUNDINGS}, got {crop_rounding!r}")
  if images.ndim != 4 or images.shape[-1] != 3:
    raise UserInputError(f"expected [N, H, W, 3] RGB images, got shape {images.shape}")
  if images.dtype == jnp.uint8:
    levels = images.astype(jnp.float32)
  else:
    levels = jnp.round(jnp.clip(images.astype(jnp.float32), 0.0, 1.0) * 255.0)
  height, width = images.shape[1:3]
  out_h, out_w = resize_output_size(height, width, image_size)
  top = crop_offset(out_h, image_size, crop_rounding)
  left = crop_offset(out_w, image_size, crop_rounding)
  # Each output pixel depends on its own row of coefficients only, so cropping the coefficient
  # rows crops the result; PIL resizes horizontally first, then vertically.
  if out_w != width:
    rows = pil_bicubic_coefficients(width, out_w)[left:left + image_size]
    levels = _resample_axis(levels, rows, axis=2)
  else:
    levels = levels[:, :, left:left + image_size]
  if out_h != height:
    rows = pil_bicubic_coefficients(height, out_h)[top:top + image_size]
    levels = _resample_axis(levels, rows, axis=1)
  else:
    levels = levels[:, top:top + image_size]
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (levels / 255.0 - mean) / std
