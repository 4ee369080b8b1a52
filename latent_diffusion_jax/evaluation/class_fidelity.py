"""Class fidelity on the shapes dataset: does a generated image show the class it was sampled for?

A class is a (color, shape) pair (`shapes.class_index`); the detectors of caption_fidelity.py read
both from the image's largest blob, and the image counts as right when both match. Position is
not part of the class, so it is not scored.
"""

from typing import Any, Dict, Sequence

import numpy as np

from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.data import shapes
from latent_diffusion_jax.evaluation.caption_fidelity import NONE, detect


def detect_class(image: np.ndarray) -> int:
  """The class (`shapes.class_index`) read from an image's pixels, or -1 without foreground."""
  found = detect(np.asarray(image))
  if found["color"] == NONE:
    return -1
  return shapes.class_index(found["color"], found["shape"])


def class_fidelity(images: np.ndarray | Sequence[np.ndarray],
                   class_labels: Sequence[int]) -> Dict[str, Any]:
  """Scores generated images against the class labels they were sampled with.

  Args:
    images: [N, H, W, 3] (or a sequence of [H, W, 3]) uint8 in [0, 255] or float in [0, 1].
    class_labels: N ints in [0, shapes.NUM_CLASSES).

  Returns:
    {"accuracy" (color and shape right), "color", "shape" (each alone), "per_class": {class name:
    accuracy over the images of that class}, "num_examples", "per_example": [{"expected",
    "detected" (class indices, -1 for nothing found), "right"}]}, accuracies in [0, 1].
  """
  labels = [int(label) for label in np.asarray(class_labels).reshape(-1)]
  if len(images) != len(labels):
    raise UserInputError(f"Got {len(images)} images but {len(labels)} class labels.")
  for label in labels:
    if not 0 <= label < shapes.NUM_CLASSES:
      raise UserInputError(f"class label {label} is outside [0, {shapes.NUM_CLASSES}).")
  per_example, hits = [], {"accuracy": 0, "color": 0, "shape": 0}
  per_class: Dict[str, list] = {}
  for image, label in zip(images, labels):
    found = detect(np.asarray(image))
    color, shape = shapes.class_name(label).split(" ")
    right = {"color": found["color"] == color, "shape": found["shape"] == shape}
    right["accuracy"] = right["color"] and right["shape"]
    for key in hits:
      hits[key] += right[key]
    detected = -1 if found["color"] == NONE else shapes.class_index(found["color"], found["shape"])
    per_example.append({"expected": label, "detected": detected, "right": right["accuracy"]})
    per_class.setdefault(shapes.class_name(label), []).append(right["accuracy"])
  count = len(labels)
  scores = {key: hits[key] / count if count else 0.0 for key in hits}
  return {**scores, "per_class": {name: float(np.mean(v)) for name, v in per_class.items()},
          "num_examples": count, "per_example": per_example}


def class_requests(images_per_class: int) -> np.ndarray:
  """Class labels int32 [18 * images_per_class]: every class `images_per_class` times."""
  return np.repeat(np.arange(shapes.NUM_CLASSES, dtype=np.int32), images_per_class)
