"""Layout fidelity on the shapes dataset: is each requested box filled with the requested shape?

For every requested box (x0, y0, x1, y1 in image fractions) with a class (a color and a shape), a
box counts as right when some shape found in the image (caption_fidelity.detect_all: each
foreground blob, read with the single-shape detectors) has its centroid inside the box and the
requested color and shape. The score is the fraction of right boxes over all requested boxes;
"color" and "present" loosen it to the color alone and to any shape at all in the box.
"""

from typing import Any, Dict, Sequence, Tuple

import numpy as np

from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.data import shapes, shapes_layout
from latent_diffusion_jax.evaluation.caption_fidelity import detect_all


def _inside(center: Tuple[float, float], box: Sequence[float]) -> bool:
  x, y = center
  return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def score_boxes(image: np.ndarray, boxes: np.ndarray, classes: np.ndarray) -> list:
  """Per requested box of one image (rows with class < 0 are padding, skipped): a dict with
  "box", "class", "right", "color" (a shape of that color inside), "present" (any shape inside)."""
  found = detect_all(np.asarray(image))
  out = []
  for box, label in zip(np.asarray(boxes, np.float64), np.asarray(classes)):
    if label < 0:
      continue
    color, shape = shapes.class_name(int(label)).split(" ")
    inside = [f for f in found if _inside(f["center"], box)]
    out.append({"box": box.tolist(), "class": int(label),
                "right": any(f["color"] == color and f["shape"] == shape for f in inside),
                "color": any(f["color"] == color for f in inside), "present": bool(inside)})
  return out


def layout_fidelity(images: np.ndarray | Sequence[np.ndarray], layout_boxes: np.ndarray,
                    layout_classes: np.ndarray) -> Dict[str, Any]:
  """Scores generated images against the layouts they were sampled with.

  Args:
    images: [N, H, W, 3] (or a sequence of [H, W, 3]) uint8 in [0, 255] or float in [0, 1].
    layout_boxes: [N, M, 4] boxes (x0, y0, x1, y1) in [0, 1].
    layout_classes: [N, M] class of each box (`shapes.class_index`), -1 for padding rows.

  Returns:
    {"accuracy" (fraction of boxes right), "color", "present", "layouts_all_right" (images whose
    every box is right), "num_boxes", "num_examples", "per_example": per image, the list of
    `score_boxes`}.
  """
  boxes, classes = np.asarray(layout_boxes), np.asarray(layout_classes)
  if boxes.ndim != 3 or boxes.shape[-1] != 4 or classes.shape != boxes.shape[:2]:
    raise UserInputError(f"layout_boxes must be [N, M, 4] and layout_classes [N, M]; got "
                         f"{boxes.shape} and {classes.shape}.")
  if len(images) != len(boxes):
    raise UserInputError(f"Got {len(images)} images but {len(boxes)} layouts.")
  if (classes >= shapes.NUM_CLASSES).any():
    raise UserInputError(f"layout_classes hold {classes.max()}, outside [0, {shapes.NUM_CLASSES}).")
  per_example = [score_boxes(image, b, c) for image, b, c in zip(images, boxes, classes)]
  flat = [box for example in per_example for box in example]
  fraction = lambda key: sum(b[key] for b in flat) / len(flat) if flat else 0.0
  all_right = [all(b["right"] for b in example) for example in per_example if example]
  return {"accuracy": fraction("right"), "color": fraction("color"),
          "present": fraction("present"),
          "layouts_all_right": float(np.mean(all_right)) if all_right else 0.0,
          "num_boxes": len(flat), "num_examples": len(per_example), "per_example": per_example}


def layout_requests(num_layouts: int, seed: int = 0, max_boxes: int = shapes_layout.MAX_OBJECTS
                    ) -> Dict[str, Any]:
  """The first `num_layouts` held-out ("test") layouts: "layouts" in the sampling API's form (per
  image a list of (box, class)), "layout_boxes" [N, M, 4] and "layout_classes" [N, M]."""
  batch = shapes_layout.generate_batch(0, num_layouts, split="test", seed=seed,
                                       max_boxes=max_boxes)
  layouts = [[(tuple(o["box"]), o["class_label"]) for o in objects] for objects in batch["objects"]]
  return {"layouts": layouts, "layout_boxes": batch["layout_boxes"],
          "layout_classes": batch["layout_classes"]}
