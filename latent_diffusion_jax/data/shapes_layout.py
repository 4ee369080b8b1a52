"""Layouts of the shapes dataset: 1 to 3 non-overlapping colored shapes anywhere, each with its box.

The layout-to-image variant (`data.shapes_variant="layout"`). Each object is a shape of the
single-shape dataset (data/shapes.py, same colors, shapes and renderer) whose square bounding box
is its box (x0, y0, x1, y1) in image fractions, x right, y down. Boxes keep a gap between each
other and from the border, so every shape stays a separate blob for the evaluators.

Held-out split, as the single-shape data does it: an object's "position" is the 2x2 grid cell
holding its box center, and no object of a "train" layout has a (color, shape, position) in
`shapes.HELD_OUT_COMBINATIONS`; every "test" layout has at least one such object, so each test
layout is one training never showed.

Example `i` of a split is a pure function of `(seed, split, i)`, drawn from its own generator,
independent of the single-shape example `i`.
"""

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.data import shapes

MAX_OBJECTS = 3
# Box side as a fraction of the image side (single-shape extents span 0.18-0.37).
_SIDE_RANGE = (0.22, 0.34)
# Minimum gap between boxes and from the border, in image fractions (2 pixels at 32 px).
_GAP = 0.0625
_BORDER = 0.03
_PLACEMENT_TRIES = 200
# Keeps the stream of layout examples apart from that of single-shape examples.
_STREAM = 1


def layout_vocabulary() -> Tuple[str, ...]:
  """Every word a layout caption can contain ("a red circle and a blue square")."""
  return ("a", "and", *shapes.COLORS, *shapes.SHAPES)


def example_rng(index: int, split: str = "train", seed: int = 0) -> np.random.Generator:
  """The generator layout example `index` of `split` draws from."""
  if split not in shapes.SPLITS:
    raise UserInputError(f"Unknown split {split!r}; expected one of {shapes.SPLITS}")
  if index < 0 or seed < 0:
    raise UserInputError(f"index and seed must be non-negative, got index={index}, seed={seed}")
  return np.random.default_rng([seed, shapes.SPLITS.index(split), index, _STREAM])


def box_position(box: Sequence[float]) -> str:
  """The 2x2 grid cell (`shapes.POSITIONS`) holding a box's center."""
  x0, y0, x1, y1 = box
  row, col = int((y0 + y1) / 2 >= 0.5), int((x0 + x1) / 2 >= 0.5)
  return shapes.POSITIONS[2 * row + col]


def _is_held_out(color: str, shape: str, box) -> bool:
  return (color, shape, box_position(box)) in shapes.HELD_OUT_COMBINATIONS


def _apart(box, others) -> bool:
  return all(box[0] >= o[2] + _GAP or o[0] >= box[2] + _GAP or
             box[1] >= o[3] + _GAP or o[1] >= box[3] + _GAP for o in others)


def _draw_object(rng: np.random.Generator, placed, held_out: bool):
  """(color, shape, box) apart from `placed`, held out exactly when `held_out`; None if no room."""
  for _ in range(_PLACEMENT_TRIES):
    color = list(shapes.COLORS)[rng.integers(len(shapes.COLORS))]
    shape = shapes.SHAPES[rng.integers(len(shapes.SHAPES))]
    side = rng.uniform(*_SIDE_RANGE)
    x0, y0 = rng.uniform(_BORDER, 1 - _BORDER - side, size=2)
    box = (float(x0), float(y0), float(x0 + side), float(y0 + side))
    if _is_held_out(color, shape, box) == held_out and _apart(box, placed):
      return color, shape, box
  return None


def sample_layout(rng: np.random.Generator, split: str) -> List[Dict[str, Any]]:
  """Draws the objects of one layout of `split`.

  Returns:
    1 to `MAX_OBJECTS` dicts with "color", "shape", "box" (x0, y0, x1, y1 floats in [0, 1]),
    "position" (grid cell of the box center) and "class_label" (`shapes.class_index`).
  """
  if split not in shapes.SPLITS:
    raise UserInputError(f"Unknown split {split!r}; expected one of {shapes.SPLITS}")
  count = 1 + int(rng.integers(MAX_OBJECTS))
  while True:
    # "test": one held-out object, placed first while the canvas is empty; "train": none at all.
    wanted = [split == "test"] + [False] * (count - 1)
    objects = []
    for held_out in wanted:
      drawn = _draw_object(rng, [o[2] for o in objects], held_out)
      if drawn is None:
        break
      objects.append(drawn)
    if len(objects) == count:
      break
  order = rng.permutation(count)  # the held-out object is not always named first
  return [{"color": objects[k][0], "shape": objects[k][1], "box": objects[k][2],
           "position": box_position(objects[k][2]),
           "class_label": shapes.class_index(objects[k][0], objects[k][1])} for k in order]


def caption(objects: Sequence[Dict[str, Any]]) -> str:
  """The caption of a layout, e.g. "a red circle and a blue square" (boxes are not named)."""
  return " and ".join(f"a {o['color']} {o['shape']}" for o in objects)


def render(objects: Sequence[Dict[str, Any]], image_size: int = 32) -> np.ndarray:
  """Draws each object's shape filling its box, anti-aliased, on the black background.

  Returns:
    uint8 array [image_size, image_size, 3].
  """
  if image_size < shapes._MIN_IMAGE_SIZE:
    raise UserInputError(f"image_size must be at least {shapes._MIN_IMAGE_SIZE}, got {image_size}")
  background = np.asarray(shapes.BACKGROUND, np.float32)
  image = np.broadcast_to(background, (image_size, image_size, 3)).copy()
  for o in objects:
    x0, y0, x1, y1 = (v * image_size for v in o["box"])
    coverage = shapes.shape_coverage(o["shape"], (y0 + y1) / 2, (x0 + x1) / 2,
                                     min(x1 - x0, y1 - y0) / 2, image_size)
    color = np.asarray(shapes.COLORS[o["color"]], np.float32)
    image += coverage[..., None] * (color - background)
  return np.round(image).astype(np.uint8)


def generate_example(index: int, *, split: str = "train", seed: int = 0, image_size: int = 32
                     ) -> Tuple[np.ndarray, str, List[Dict[str, Any]]]:
  """Layout example `index` of `split`: (image uint8 [S, S, 3], caption, objects)."""
  objects = sample_layout(example_rng(index, split, seed), split)
  return render(objects, image_size), caption(objects), objects


def layout_arrays(objects: Sequence[Dict[str, Any]], max_boxes: int = MAX_OBJECTS
                  ) -> Tuple[np.ndarray, np.ndarray]:
  """The batch fields of one layout: boxes float32 [max_boxes, 4] and classes int32 [max_boxes],
  padding rows with class -1 and an all-zero box.

  Objects may give "class_label" or "color" and "shape".
  """
  if len(objects) > max_boxes:
    raise UserInputError(f"A layout of {len(objects)} boxes does not fit "
                         f"model.conditioner.layout.max_boxes={max_boxes}; raise it to at least "
                         f"{len(objects)}.")
  boxes = np.zeros((max_boxes, 4), np.float32)
  classes = np.full((max_boxes,), -1, np.int32)
  for k, o in enumerate(objects):
    boxes[k] = o["box"]
    classes[k] = (o["class_label"] if "class_label" in o
                  else shapes.class_index(o["color"], o["shape"]))
  return boxes, classes


def generate_batch(start: int, count: int, *, split: str = "train", seed: int = 0,
                   image_size: int = 32, max_boxes: int = MAX_OBJECTS
                   ) -> Dict[str, Any]:
  """Layout examples `start .. start + count - 1` as arrays.

  Returns:
    {"images" uint8 [N, S, S, 3], "captions" list of str, "layout_boxes" float32 [N, M, 4],
    "layout_classes" int32 [N, M] (M = max_boxes, padding class -1), "objects" per example}.
  """
  images = np.zeros((count, image_size, image_size, 3), np.uint8)
  boxes = np.zeros((count, max_boxes, 4), np.float32)
  classes = np.zeros((count, max_boxes), np.int32)
  captions, objects = [], []
  for k in range(count):
    images[k], text, objs = generate_example(start + k, split=split, seed=seed,
                                             image_size=image_size)
    boxes[k], classes[k] = layout_arrays(objs, max_boxes)
    captions.append(text)
    objects.append(objs)
  return {"images": images, "captions": captions, "layout_boxes": boxes,
          "layout_classes": classes, "objects": objects}


def objects_from_arrays(boxes: np.ndarray, classes: np.ndarray) -> List[Dict[str, Any]]:
  """The objects of one padded layout row (padding rows, class < 0, dropped), with color and
  shape named from the class."""
  out = []
  for box, label in zip(np.asarray(boxes), np.asarray(classes)):
    if label < 0:
      continue
    color, shape = shapes.class_name(int(label)).split(" ")
    out.append({"color": color, "shape": shape, "box": tuple(float(v) for v in box),
                "class_label": int(label)})
  return out
