"""Decoding web images into fixed-size RGB8 crops, with a stated policy for every odd input.

  image = preprocess_image(data, resolution=512, key="00001234", crop="center")
  image.pixels          # uint8 [512, 512, 3]
  image.original_size   # (height, width) of the decoded image, before resizing
  image.crop_offset     # (top, left) of the crop inside the resized image

With `buckets` ((height, width) pairs, data/buckets.py) the crop is the bucket nearest the image's
aspect ratio instead of a square (`image.bucket` says which), after a cover resize.

Kept (converted to RGB8): RGB; grayscale ("L", "1"); palette ("P"); CMYK and YCbCr (PIL's
conversion, no ICC colour management); 16-bit grayscale ("I;16*", "I": scaled by 255/65535; PIL
itself already reads 16-bit RGB PNGs as 8-bit RGB); images with alpha ("RGBA", "LA", "PA", "P" with
a transparent colour), composited onto white, because transparent pixels usually hold arbitrary
colours that the web page showed as background; animated images (the first frame). EXIF
orientation is applied first.

Skipped, raising `SkipSample(reason)`:
  empty_image       zero bytes.
  corrupt_image     not decodable (unknown format, garbage, broken header or data).
  truncated_image   the header decodes but the pixel data ends early.
  image_too_large   over PIL's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS).
  degenerate_image  a side shorter than 2 pixels (nothing to resize from).
  too_small         shorter side below `min_size`.
  aspect_ratio      long side / short side above `max_aspect_ratio`.
  unsupported_mode  a pixel format with no sensible RGB8 reading (32-bit float "F").
"""

import dataclasses
import io
import warnings
import zlib
from typing import Tuple

import numpy as np
from PIL import Image, ImageOps
from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.data.buckets import cover_size, nearest_bucket

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_EXIF_ORIENTATION = 0x0112


class SkipSample(Exception):
  """A sample that is skipped (and counted) rather than failing the job."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


@dataclasses.dataclass(frozen=True)
class ProcessedImage:
  """A crop ready for the VAE plus where it came from."""
  pixels: np.ndarray              # uint8 [resolution, resolution, 3] (or the bucket's [h, w, 3])
  original_size: Tuple[int, int]  # (height, width) before resizing
  crop_offset: Tuple[int, int]    # (top, left) inside the resized image
  bucket: int = -1                # index into `buckets`; -1 without buckets


def _open(data: bytes) -> Image.Image:
  if not data:
    raise SkipSample("empty_image")
  try:
    with warnings.catch_warnings():
      # Large-but-legal images warn; only the hard limit (an error) skips them.
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      return Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    raise SkipSample("image_too_large", str(e)) from None
  except Exception as e:  # PIL raises many types for garbage input
    raise SkipSample("corrupt_image", f"{type(e).__name__}: {e}") from None


def _to_rgb8(img: Image.Image) -> Image.Image:
  mode = img.mode
  if mode == "F":
    raise SkipSample("unsupported_mode", "32-bit float pixels")
  if mode in _SIXTEEN_BIT_MODES:
    values = np.asarray(img, dtype=np.float64)
    # PIL's own I -> L conversion clips at 255 instead of scaling, turning most pixels white.
    return Image.fromarray(np.rint(np.clip(values, 0, 65535) * (255 / 65535)).astype(np.uint8),
                           "L").convert("RGB")
  if mode == "P" and "transparency" in img.info:
    img, mode = img.convert("RGBA"), "RGBA"
  if mode in _ALPHA_MODES:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  if mode != "RGB":
    try:
      return img.convert("RGB")
    except Exception as e:
      raise SkipSample("unsupported_mode", f"{mode}: {e}") from None
  return img


def crop_offset(height: int, width: int, resolution: int, crop: str, key: str,
                seed: int, crop_width: int | None = None) -> Tuple[int, int]:
  """(top, left) of the crop `resolution` high and `crop_width` (default: `resolution`) wide;
  "random" depends only on (seed, key), not on order."""
  crop_width = resolution if crop_width is None else crop_width
  if crop == "center":
    return (height - resolution) // 2, (width - crop_width) // 2
  if crop == "random":
    rng = np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])
    top = int(rng.integers(0, height - resolution + 1))
    return top, int(rng.integers(0, width - crop_width + 1))
  raise UserInputError(f"Unknown crop {crop!r}; valid: center, random.")


def resized_size(height: int, width: int, resolution: int) -> Tuple[int, int]:
  """(height, width) with the shorter side equal to `resolution`, aspect ratio kept."""
  return cover_size(height, width, resolution, resolution)


def preprocess_image(data: bytes, *, resolution: int, key: str = "", crop: str = "center",
                     seed: int = 0, min_size: int = 0, max_aspect_ratio: float = 0.0,
                     original_size: Tuple[int, int] | None = None,
                     buckets: Tuple[Tuple[int, int], ...] = ()) -> ProcessedImage:
  """Decodes image bytes and returns a `resolution` square crop of the short-side-resized image,
  or with `buckets` a crop to the nearest bucket of the image resized to cover it.

  Args:
    data: encoded image (JPEG, PNG, WebP, anything PIL reads).
    resolution: side of the output crop in pixels.
    key: the sample key; seeds the random crop.
    crop: "center" or "random".
    seed: random-crop seed.
    min_size: skip images whose shorter side is below this (0 disables the filter).
    max_aspect_ratio: skip images whose long/short side ratio exceeds this (<= 0 disables).
    original_size: (height, width) to record instead of the decoded size, e.g. the size before
      img2dataset resized the image (from the sample's json); None records the decoded size.
    buckets: (height, width) crop sizes; the image goes to the one nearest its aspect ratio
      (after EXIF rotation; data/buckets.py) and `resolution` is ignored. Empty: a square crop.

  Returns:
    The crop and its provenance.

  Raises:
    SkipSample: the image is unusable or filtered out; `reason` says which (see module doc).
  """
  img = _open(data)
  width, height = img.size  # from the header: filters run before the pixels are decoded
  if min(width, height) < 2:
    raise SkipSample("degenerate_image", f"{width}x{height}")
  if min_size > 0 and min(width, height) < min_size:
    raise SkipSample("too_small", f"{width}x{height} < {min_size}")
  if max_aspect_ratio > 0 and max(width, height) / min(width, height) > max_aspect_ratio:
    raise SkipSample("aspect_ratio", f"{width}x{height}")
  try:
    if img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # turned by 90 degrees
      width, height = height, width
    bucket = nearest_bucket(height, width, buckets) if buckets else -1
    crop_h, crop_w = buckets[bucket] if buckets else (resolution, resolution)
    # JPEG only: decode at a reduced DCT scale that still covers the resized size, several times
    # faster for large photos. A no-op for other formats. (img.size is before the rotation, so
    # the crop's sides turn with it.)
    turned = (img.size[0], img.size[1]) != (width, height)
    target_h, target_w = cover_size(img.size[1], img.size[0],
                                    *((crop_w, crop_h) if turned else (crop_h, crop_w)))
    img.draft(None, (target_w, target_h))
    img.load()
    img = ImageOps.exif_transpose(img)
  except OSError as e:
    reason = "truncated_image" if "truncated" in str(e) else "corrupt_image"
    raise SkipSample(reason, str(e)) from None
  except Exception as e:
    raise SkipSample("corrupt_image", f"{type(e).__name__}: {e}") from None
  img = _to_rgb8(img)
  new_h, new_w = cover_size(img.size[1], img.size[0], crop_h, crop_w)
  img = img.resize((new_w, new_h), Image.BICUBIC)
  top, left = crop_offset(new_h, new_w, crop_h, crop, key, seed, crop_width=crop_w)
  pixels = np.asarray(img, dtype=np.uint8)[top:top + crop_h, left:left + crop_w]
  return ProcessedImage(pixels=np.ascontiguousarray(pixels),
                        original_size=tuple(original_size) if original_size else (height, width),
                        crop_offset=(top, left), bucket=bucket)
