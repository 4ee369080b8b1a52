"""Aspect-ratio buckets: which bucket an image goes to, the cover-resize and crop that fit it, and
the check that every bucket can be encoded and denoised.

  config.data.buckets = ((256, 256), (192, 320), (320, 192))   # pixel (height, width) pairs

An image goes to the bucket whose aspect ratio is nearest its own in log space,
|log(w / h) - log(bw / bh)|, compared exactly (as rationals); a tie goes to the bucket listed
first. It is then resized so that it covers the bucket (the smaller scale that makes both sides at
least the bucket's) and cropped to it. An empty list keeps the single square size.
"""

from fractions import Fraction
from typing import Sequence, Tuple

import ml_collections as mc

from latent_diffusion_jax.core.errors import UserInputError

Bucket = Tuple[int, int]


def parse_buckets(value) -> Tuple[Bucket, ...]:
  """`data.buckets` as a tuple of (height, width) int pairs; refuses malformed or repeated ones."""
  out = []
  for entry in value or ():
    pair = tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                 for v in pair):
      raise UserInputError(f"data.buckets entry {entry!r} is not a (height, width) pair of "
                           "positive integers.")
    if pair in out:
      raise UserInputError(f"data.buckets lists {pair} twice.")
    out.append(pair)
  return tuple(out)


def _log_aspect_distance(height: int, width: int, bucket: Bucket) -> Fraction:
  """exp(|log(w/h) - log(bw/bh)|) as an exact fraction: the larger of the two cross products over
  the smaller. Monotonic in the log distance, so it orders buckets the same way."""
  a, b = width * bucket[0], height * bucket[1]
  return Fraction(max(a, b), min(a, b))


def nearest_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> int:
  """Index of the bucket nearest the image's aspect ratio (log distance; ties: the first listed)."""
  if not buckets:
    raise UserInputError("nearest_bucket needs at least one bucket.")
  distances = [_log_aspect_distance(height, width, b) for b in buckets]
  return distances.index(min(distances))


def cover_size(height: int, width: int, target_height: int, target_width: int) -> Tuple[int, int]:
  """(height, width) resized by one scale, aspect kept, so that both sides cover the target."""
  scale = max(target_height / height, target_width / width)
  return max(target_height, round(height * scale)), max(target_width, round(width * scale))


def canvas(buckets: Sequence[Bucket]) -> Bucket:
  """The smallest (height, width) that holds every bucket (tf.data pads crops to it)."""
  return max(h for h, _ in buckets), max(w for _, w in buckets)


def downsampling(model: mc.ConfigDict) -> Tuple[int, int]:
  """(first stage factor 2**(len(vae.block_out_channels)-1), UNet factor
  2**(len(unet.block_out_channels)-1)) of a config's model section."""
  return (2 ** (len(model.vae.block_out_channels) - 1),
          2 ** (len(model.unet.block_out_channels) - 1))


def check_buckets(config: mc.ConfigDict) -> Tuple[Bucket, ...]:
  """`config.data.buckets`, validated: every side divides by the first stage's downsampling
  factor f (pixels -> latents) times the UNet's own 2**(levels-1) (its down/up-sampled latents
  must line up with the skip connections).

  Raises:
    UserInputError: naming the bucket, the side and both factors.
  """
  buckets = parse_buckets(config.data.buckets)
  f, u = downsampling(config.model)
  for bucket in buckets:
    for name, side in zip(("height", "width"), bucket):
      if side % f:
        raise UserInputError(
            f"data.buckets entry {bucket}: {name} {side} is not divisible by the first stage's "
            f"downsampling factor {f} (2**(len(model.vae.block_out_channels)-1)); every side must "
            f"be a multiple of {f * u} ({f} for the first stage x {u} for the UNet's "
            f"{len(config.model.unet.block_out_channels)} levels).")
      if side % (f * u):
        raise UserInputError(
            f"data.buckets entry {bucket}: {name} {side} gives {side // f} latent pixels, not "
            f"divisible by the UNet's downsampling {u} (2**(len(model.unet.block_out_channels)"
            f"-1)); every side must be a multiple of {f * u} = first stage {f} x UNet {u}.")
  return buckets


def latent_shape(bucket: Bucket, factor: int, channels: int) -> Tuple[int, int, int]:
  """(h, w, channels) of a bucket's latents through a first stage of downsampling `factor`."""
  return bucket[0] // factor, bucket[1] // factor, channels
