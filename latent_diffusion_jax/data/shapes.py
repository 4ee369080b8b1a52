"""Captioned images of one colored shape on a black background: the embedded default dataset.

Every image shows one shape with three caption attributes, color x shape x position, and an
optional size word:

  colors     red, green, blue, yellow, magenta, cyan
  shapes     circle, square, triangle
  positions  top left, top right, bottom left, bottom right (cells of a 2x2 grid)
  sizes      small, large (always varied in the pixels; named in the caption only with
             `include_size=True`)

Captions read "a red triangle in the top left" or "a large red triangle in the top left".
Every example is also one of 18 classes, color x shape (`class_index`, `class_name`: class
`SHAPES.index(shape) * 6 + color index`, named "red circle"), for class-conditional models;
data/shapes_layout.py draws images of several shapes with their boxes from the same renderer.

The 12 (color, shape, position) combinations in `HELD_OUT_COMBINATIONS` never appear in "train"
and are the only ones in "test", so sampling test captions measures generalization to unseen
combinations. Each color holds out two combinations with different shapes and positions, so
every (color, shape), (color, position) and (shape, position) pair is still seen in training.

Example `i` of a split is a pure function of `(seed, split, i)`: each example draws from its own
`numpy.random.Generator`, so examples can be generated in any order or in parallel.
"""

import itertools
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
from latent_diffusion_jax.core.errors import UserInputError

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 210, 220),
}
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: Tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
SIZES: Tuple[str, ...] = ("small", "large")
BACKGROUND: Tuple[int, int, int] = (0, 0, 0)
SPLITS: Tuple[str, ...] = ("train", "test")

NUM_CLASSES = len(SHAPES) * len(COLORS)


def class_index(color: str, shape: str) -> int:
  """The class of a (color, shape) pair: `SHAPES.index(shape) * len(COLORS) + color's index`."""
  if color not in COLORS or shape not in SHAPES:
    raise UserInputError(f"Unknown class ({color!r}, {shape!r}); colors: {', '.join(COLORS)}; "
                         f"shapes: {', '.join(SHAPES)}.")
  return SHAPES.index(shape) * len(COLORS) + list(COLORS).index(color)


def class_name(index: int) -> str:
  """The name of class `index`, color then shape: `class_name(0)` is "red circle"."""
  if not 0 <= int(index) < NUM_CLASSES:
    raise UserInputError(f"Class index {index} is outside [0, {NUM_CLASSES}).")
  shape, color = divmod(int(index), len(COLORS))
  return f"{list(COLORS)[color]} {SHAPES[shape]}"


def class_names() -> Tuple[str, ...]:
  """All class names in index order (the `model.conditioner.class_names` of the shapes configs)."""
  return tuple(class_name(i) for i in range(NUM_CLASSES))


# Color c holds out (shape c % 3, position c % 4) and (shape (c + 1) % 3, position (c + 2) % 4).
HELD_OUT_COMBINATIONS: Tuple[Tuple[str, str, str], ...] = (
    ("red", "circle", "top left"),
    ("red", "square", "bottom left"),
    ("green", "square", "top right"),
    ("green", "triangle", "bottom right"),
    ("blue", "triangle", "bottom left"),
    ("blue", "circle", "top left"),
    ("yellow", "circle", "bottom right"),
    ("yellow", "square", "top right"),
    ("magenta", "square", "top left"),
    ("magenta", "triangle", "bottom left"),
    ("cyan", "triangle", "top right"),
    ("cyan", "circle", "bottom right"),
)

# Shape extent (bounding-box side) as a fraction of the grid cell side.
_EXTENT_RANGE = {"small": (0.36, 0.46), "large": (0.62, 0.75)}
# Keeps every shape this far (in cell sides) from the image border and the grid center lines,
# so the quadrant of its centroid is never ambiguous.
_CELL_MARGIN = 0.1
# Subpixel samples per pixel side for anti-aliased edges.
_SUPERSAMPLE = 4
_MIN_IMAGE_SIZE = 16


def combinations(split: str) -> Tuple[Tuple[str, str, str], ...]:
  """The (color, shape, position) combinations a split draws from.

  Args:
    split: "train" or "test".

  Returns:
    The 60 combinations not held out for "train", `HELD_OUT_COMBINATIONS` for "test".
  """
  _check_split(split)
  if split == "test":
    return HELD_OUT_COMBINATIONS
  held_out = set(HELD_OUT_COMBINATIONS)
  return tuple(c for c in itertools.product(COLORS, SHAPES, POSITIONS) if c not in held_out)


def vocabulary() -> Tuple[str, ...]:
  """Every word any caption can contain, size words included."""
  return ("a", "in", "the", *SIZES, *COLORS, *SHAPES, "top", "bottom", "left", "right")


def sample_attributes(rng: np.random.Generator, split: str) -> Dict[str, Any]:
  """Draws the attributes of one example of `split`.

  Args:
    rng: the generator to draw from.
    split: "train" or "test"; decides which combinations are allowed.

  Returns:
    A dict with the caption attributes "color", "shape", "position", "size" (str), the
    geometry "extent", "offset_y", "offset_x" (float, in units of the grid cell side; offsets
    move the shape's bounding-box center away from the cell center) and "class_label" (int,
    `class_index(color, shape)`; drawing it takes nothing from `rng`).
  """
  choices = combinations(split)
  color, shape, position = choices[rng.integers(len(choices))]
  size = SIZES[rng.integers(len(SIZES))]
  extent = rng.uniform(*_EXTENT_RANGE[size])
  max_offset = (1.0 - extent) / 2 - _CELL_MARGIN
  offset_y, offset_x = rng.uniform(-max_offset, max_offset, size=2)
  return {"color": color, "shape": shape, "position": position, "size": size,
          "extent": float(extent), "offset_y": float(offset_y), "offset_x": float(offset_x),
          "class_label": class_index(color, shape)}


def caption(attributes: Dict[str, Any], include_size: bool = False) -> str:
  """The caption of an example, e.g. "a large red triangle in the top left"."""
  size = f"{attributes['size']} " if include_size else ""
  return f"a {size}{attributes['color']} {attributes['shape']} in the {attributes['position']}"


def coverage(attributes: Dict[str, Any], image_size: int = 32) -> np.ndarray:
  """The share of each pixel the shape of `attributes` covers: float [image_size, image_size].

  The geometry `render` colors; control maps (data/control.py) threshold it.
  """
  if image_size < _MIN_IMAGE_SIZE:
    raise UserInputError(f"image_size must be at least {_MIN_IMAGE_SIZE}, got {image_size}")
  cell = image_size / 2
  row, col = divmod(POSITIONS.index(attributes["position"]), 2)
  center_y = (row + 0.5 + attributes["offset_y"]) * cell
  center_x = (col + 0.5 + attributes["offset_x"]) * cell
  half = attributes["extent"] * cell / 2

  return shape_coverage(attributes["shape"], center_y, center_x, half, image_size)


def shape_coverage(shape: str, center_y: float, center_x: float, half: float,
                   image_size: int) -> np.ndarray:
  """Anti-aliased share [image_size, image_size] of each pixel covered by a shape.

  Args:
    shape: one of `SHAPES`.
    center_y, center_x: center of the shape's square bounding box, in pixels from the top left.
    half: half the bounding-box side, in pixels.
    image_size: image side in pixels.
  """
  n = image_size * _SUPERSAMPLE
  coords = (np.arange(n) + 0.5) / _SUPERSAMPLE
  y, x = coords[:, None], coords[None, :]
  if shape == "circle":
    inside = (y - center_y) ** 2 + (x - center_x) ** 2 <= half ** 2
  elif shape == "square":
    inside = (np.abs(y - center_y) <= half) & (np.abs(x - center_x) <= half)
  elif shape == "triangle":
    # Apex up, base down: the half-width grows from 0 at the top edge to `half` at the bottom.
    depth = y - (center_y - half)
    inside = (depth >= 0) & (depth <= 2 * half) & (np.abs(x - center_x) <= depth / 2)
  else:
    raise UserInputError(f"Unknown shape {shape!r}; expected one of {SHAPES}")
  return inside.reshape(image_size, _SUPERSAMPLE, image_size, _SUPERSAMPLE).mean(axis=(1, 3))


def render(attributes: Dict[str, Any], image_size: int = 32) -> np.ndarray:
  """Draws the shape described by `attributes` with anti-aliased edges.

  Args:
    attributes: as returned by `sample_attributes`.
    image_size: side of the square image in pixels, at least 16.

  Returns:
    uint8 array [image_size, image_size, 3].
  """
  covered = coverage(attributes, image_size)
  background = np.asarray(BACKGROUND, np.float32)
  color = np.asarray(COLORS[attributes["color"]], np.float32)
  image = background + covered[..., None] * (color - background)
  return np.round(image).astype(np.uint8)


def example_rng(index: int, split: str = "train", seed: int = 0) -> np.random.Generator:
  """The generator that example `index` of `split` draws from; independent across examples."""
  _check_split(split)
  if index < 0 or seed < 0:
    raise UserInputError(f"index and seed must be non-negative, got index={index}, seed={seed}")
  return np.random.default_rng([seed, SPLITS.index(split), index])


def generate_example(index: int, *, split: str = "train", seed: int = 0, image_size: int = 32,
                     include_size: bool = False) -> Tuple[np.ndarray, str, Dict[str, Any]]:
  """Example `index` of `split`, a pure function of its arguments.

  Args:
    index: position of the example in the split, >= 0.
    split: "train" or "test".
    seed: dataset seed, >= 0.
    image_size: image side in pixels, at least 16.
    include_size: whether the caption names the size ("a large red ...").

  Returns:
    (image uint8 [image_size, image_size, 3], caption, attributes as in `sample_attributes`).
  """
  attributes = sample_attributes(example_rng(index, split, seed), split)
  return render(attributes, image_size), caption(attributes, include_size), attributes


def generate_batch(start: int, count: int, *, split: str = "train", seed: int = 0,
                   image_size: int = 32, include_size: bool = False
                   ) -> Tuple[np.ndarray, List[str], List[Dict[str, Any]]]:
  """Examples `start .. start + count - 1` of `split`.

  Args:
    start: index of the first example.
    count: number of examples.
    split: "train" or "test".
    seed: dataset seed.
    image_size: image side in pixels.
    include_size: whether captions name the size.

  Returns:
    (images uint8 [count, image_size, image_size, 3], captions, attributes), example `k` of the
    batch equal to `generate_example(start + k, ...)`.
  """
  examples = [generate_example(i, split=split, seed=seed, image_size=image_size,
                               include_size=include_size) for i in range(start, start + count)]
  images = np.zeros((count, image_size, image_size, 3), np.uint8)
  for k, (image, _, _) in enumerate(examples):
    images[k] = image
  return images, [e[1] for e in examples], [e[2] for e in examples]


def palette_array(names: Sequence[str] = tuple(COLORS)) -> np.ndarray:
  """The RGB values of the named colors as float32 [len(names), 3]."""
  return np.asarray([COLORS[name] for name in names], np.float32)


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise UserInputError(f"Unknown split {split!r}; expected one of {SPLITS}")
