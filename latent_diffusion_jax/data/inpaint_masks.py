"""Random inpainting masks, drawn inside the train step (jittable, seeded by the step's key).

Like Stable Diffusion's inpainting training (synthetic masks, everything masked in a quarter of the
examples), each mask is the union of up to `max_boxes` axis-aligned rectangles and `max_strokes`
thick polylines (free-form "brush strokes", as LaMa / DeepFill draw them), or, with probability
`full_mask_prob`, the whole image. At least one rectangle or stroke is always drawn. Masks are
float [B, H, W, 1] in {0, 1}, 1 = repaint, the layout `models.image_conditioning` reads.

Drawing from the step's key makes the masks a pure function of (run seed, step, example): a
resumed run draws the masks an uninterrupted run would have drawn.
"""

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp
import ml_collections as mc

from latent_diffusion_jax.core.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class MaskSettings:
  """Sizes are fractions of the image side.

  Attributes:
    full_mask_prob: share of examples whose whole image is masked.
    max_boxes: each example draws 0..max_boxes rectangles.
    max_strokes: and 0..max_strokes strokes (one rectangle when both counts come out 0).
    stroke_vertices: points per stroke polyline (>= 2).
    stroke_width: (min, max) stroke thickness.
    box_size: (min, max) rectangle side.
  """
  full_mask_prob: float = 0.25
  max_boxes: int = 3
  max_strokes: int = 2
  stroke_vertices: int = 4
  stroke_width: Tuple[float, float] = (0.05, 0.15)
  box_size: Tuple[float, float] = (0.1, 0.6)

  def __post_init__(self):
    if not 0.0 <= self.full_mask_prob <= 1.0:
      raise UserInputError(f"mask.full_mask_prob must lie in [0, 1], got {self.full_mask_prob}.")
    if self.max_boxes < 0 or self.max_strokes < 0 or self.max_boxes + self.max_strokes == 0:
      raise UserInputError(f"mask.max_boxes={self.max_boxes} and mask.max_strokes="
                           f"{self.max_strokes} must be >= 0 and not both 0.")
    if self.stroke_vertices < 2:
      raise UserInputError(f"mask.stroke_vertices must be >= 2, got {self.stroke_vertices}.")
    for name in ("stroke_width", "box_size"):
      low, high = getattr(self, name)
      if not 0.0 < low <= high <= 1.0:
        raise UserInputError(f"mask.{name}={(low, high)} must satisfy 0 < min <= max <= 1.")

  @classmethod
  def from_config(cls, cfg: mc.ConfigDict) -> "MaskSettings":
    values = cfg.to_dict()
    return cls(full_mask_prob=float(values["full_mask_prob"]), max_boxes=int(values["max_boxes"]),
               max_strokes=int(values["max_strokes"]),
               stroke_vertices=int(values["stroke_vertices"]),
               stroke_width=tuple(float(v) for v in values["stroke_width"]),
               box_size=tuple(float(v) for v in values["box_size"]))


def _segment_distance(py, px, a, b):
  """Distance from pixel centers (py, px) [H, W] to the segment a -> b (points (y, x))."""
  d = b - a
  length2 = jnp.maximum(jnp.sum(d * d), 1e-12)
  t = jnp.clip(((py - a[0]) * d[0] + (px - a[1]) * d[1]) / length2, 0.0, 1.0)
  return jnp.sqrt((py - a[0] - t * d[0]) ** 2 + (px - a[1] - t * d[1]) ** 2)


def _one_mask(key: jax.Array, size: Tuple[int, int], s: MaskSettings) -> jnp.ndarray:
  k_full, k_counts, k_boxes, k_strokes = jax.random.split(key, 4)
  h, w = size
  py = ((jnp.arange(h) + 0.5) / h)[:, None]
  px = ((jnp.arange(w) + 0.5) / w)[None, :]
  k_nb, k_ns = jax.random.split(k_counts)
  n_boxes = jax.random.randint(k_nb, (), 0, s.max_boxes + 1)
  n_strokes = jax.random.randint(k_ns, (), 0, s.max_strokes + 1)
  # Never an empty mask: one rectangle (or, without rectangles, one stroke) when both are 0.
  none = (n_boxes + n_strokes) == 0
  if s.max_boxes > 0:
    n_boxes = jnp.where(none, 1, n_boxes)
  else:
    n_strokes = jnp.where(none, 1, n_strokes)
  mask = jnp.zeros((h, w), bool)
  if s.max_boxes > 0:
    k_size, k_center = jax.random.split(k_boxes)
    sides = jax.random.uniform(k_size, (s.max_boxes, 2), minval=s.box_size[0], maxval=s.box_size[1])
    centers = jax.random.uniform(k_center, (s.max_boxes, 2))
    inside = ((jnp.abs(py[None] - centers[:, 0, None, None]) <= sides[:, 0, None, None] / 2)
              & (jnp.abs(px[None] - centers[:, 1, None, None]) <= sides[:, 1, None, None] / 2))
    active = jnp.arange(s.max_boxes) < n_boxes
    mask |= jnp.any(inside & active[:, None, None], axis=0)
  if s.max_strokes > 0:
    k_start, k_angle, k_len, k_width = jax.random.split(k_strokes, 4)
    v = s.stroke_vertices
    start = jax.random.uniform(k_start, (s.max_strokes, 2))
    angles = jax.random.uniform(k_angle, (s.max_strokes, v - 1), maxval=2 * jnp.pi)
    lengths = jax.random.uniform(k_len, (s.max_strokes, v - 1), minval=0.1, maxval=0.4)
    steps = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1) * lengths[..., None]
    points = jnp.clip(jnp.concatenate([start[:, None], start[:, None] + jnp.cumsum(steps, 1)], 1),
                      0.0, 1.0)
    widths = jax.random.uniform(k_width, (s.max_strokes,), minval=s.stroke_width[0],
                                maxval=s.stroke_width[1])
    dist = jax.vmap(jax.vmap(lambda a, b: _segment_distance(py, px, a, b)))(
        points[:, :-1], points[:, 1:])  # [strokes, v - 1, H, W]
    inside = jnp.any(dist <= widths[:, None, None, None] / 2, axis=1)
    active = jnp.arange(s.max_strokes) < n_strokes
    mask |= jnp.any(inside & active[:, None, None], axis=0)
  full = jax.random.bernoulli(k_full, s.full_mask_prob)
  return jnp.where(full, True, mask).astype(jnp.float32)


def random_masks(key: jax.Array, batch: int, size: Tuple[int, int],
                 settings: MaskSettings) -> jnp.ndarray:
  """`batch` masks float [batch, H, W, 1] in {0, 1} (1 = repaint); example i draws from
  `fold_in(key, i)`, so a mask does not depend on the batch size."""
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))
  return jax.vmap(lambda k: _one_mask(k, tuple(size), settings))(keys)[..., None]
