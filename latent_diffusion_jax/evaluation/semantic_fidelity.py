"""Semantic synthesis fidelity on the held-out shapes: does each pixel take the map's color?

Held-out segmentation maps (the shapes "test" split's images read with the run's
`model.image_conditioning.segmentation` scheme, data/segmentation.py) are turned into images by
the model. Every map pixel's class has an expected color: the background's for class 0, and for a
shape class the palette color the class names ("color" and "color_shape" schemes) or, for the
"shape" scheme, which carries no color, the caption's. A generated pixel reads as the background
when its RGB distance from it is below a third of the dimmest palette color's (the caption-
fidelity detector's foreground threshold), else as the palette color nearest in direction (so
anti-aliased edges and dim generations keep their hue, as in `caption_fidelity.detect`); it agrees
when that is the expected color:

  shape_agreement       over the map's shape pixels: the issue's bar is >= 80%
  background_agreement  over its background pixels
  pixel_agreement       over all pixels
"""

import json
import os
import time
from typing import Any, Dict, Optional, Sequence

import numpy as np

from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.data import segmentation, shapes
from latent_diffusion_jax.evaluation import held_out_images

_COLOR_NAMES = tuple(shapes.COLORS)
_BACKGROUND = np.asarray(shapes.BACKGROUND, np.float32)
_OFFSETS = shapes.palette_array(_COLOR_NAMES).astype(np.float32) - _BACKGROUND
_DIRECTIONS = _OFFSETS / np.linalg.norm(_OFFSETS, axis=1, keepdims=True)
# The caption-fidelity detector's foreground threshold: a third of the dimmest palette color.
_FOREGROUND = 0.33 * float(np.min(np.linalg.norm(_OFFSETS, axis=1)))


def expected_colors(labels: np.ndarray, scheme: str,
                    attributes: Optional[Sequence[Dict[str, Any]]] = None) -> np.ndarray:
  """int [N, H, W]: 0 where a map pixel expects the background, 1 + palette index elsewhere.

  Args:
    labels: class ids [N, H, W] of `scheme`.
    scheme: "shape", "color" or "color_shape".
    attributes: per map, the caption's attributes; needed by the "shape" scheme (its classes
      name no color).
  """
  segmentation.num_classes(scheme)
  labels = np.asarray(labels).astype(np.int64)
  shape_pixels = labels > 0
  if scheme == "color":
    color = labels - 1
  elif scheme == "color_shape":
    color = (labels - 1) // len(shapes.SHAPES)
  else:
    if attributes is None or len(attributes) != len(labels):
      raise UserInputError("The shape segmentation scheme names no colors: give one attribute "
                           "set (the caption's color) per map.")
    ids = np.asarray([_COLOR_NAMES.index(str(a["color"])) for a in attributes])
    color = np.broadcast_to(ids[:, None, None], labels.shape)
  return np.where(shape_pixels, color + 1, 0)


def nearest_colors(images: np.ndarray) -> np.ndarray:
  """int [N, H, W]: each pixel of uint8 images [N, H, W, 3] read as 0 (background: nearer to it
  than the foreground threshold) or 1 + the index of the palette color nearest in direction."""
  offsets = np.asarray(images, np.float32) - _BACKGROUND
  hue = 1 + np.argmax(offsets @ _DIRECTIONS.T, axis=-1)
  return np.where(np.linalg.norm(offsets, axis=-1) > _FOREGROUND, hue, 0)


def semantic_scores(images: np.ndarray, labels: np.ndarray, scheme: str,
                    attributes: Optional[Sequence[Dict[str, Any]]] = None) -> Dict[str, Any]:
  """Per-pixel color agreement of uint8 images [N, H, W, 3] with class maps [N, H, W].

  Returns:
    "shape_agreement", "background_agreement", "pixel_agreement" (pooled over all maps' pixels
    of that kind), "num_examples", and "per_example" rows with each map's shape agreement.
  """
  images, labels = np.asarray(images), np.asarray(labels)
  if images.shape[:3] != labels.shape:
    raise UserInputError(f"Images {images.shape} and maps {labels.shape} differ in size.")
  right = nearest_colors(images) == expected_colors(labels, scheme, attributes)
  shape = labels > 0
  share = lambda ok, where: float(ok[where].mean()) if where.any() else 0.0  # noqa: E731
  rows = [{"shape_agreement": share(right[i], shape[i]),
           "background_agreement": share(right[i], ~shape[i])} for i in range(len(images))]
  return {"shape_agreement": share(right, shape), "background_agreement": share(right, ~shape),
          "pixel_agreement": float(right.mean()) if right.size else 0.0,
          "num_examples": len(images), "per_example": rows}


def evaluate(bundle, *, num_images: int = 96, prompt: str = "caption", seed: int = 1234,
             num_steps: int = 50, guidance_scale: float = 3.0, sampler: str = "ddim",
             batch_size: int = 64, out_dir: Optional[str] = None, progress=None
             ) -> Dict[str, Any]:
  """Generates images from held-out maps of the run's scheme and scores their colors; writes
  images and scores (semantic_fidelity.json) to `out_dir` when given.

  Args:
    prompt: "caption" (each image's caption) or "empty" ("" for every image).
  """
  from latent_diffusion_jax.sampling.image_conditioned import semantic_to_image
  if prompt not in ("caption", "empty"):
    raise UserInputError(f"prompt must be 'caption' or 'empty', got {prompt!r}.")
  held_out_images.require_kind(bundle, "semantic", "Semantic synthesis fidelity")
  scheme = held_out_images.run_config(bundle).model.image_conditioning.segmentation
  images, captions, attributes = held_out_images.held_out_examples(num_images, bundle.image_size)
  labels = segmentation.shapes_segmentation(images, [a["color"] for a in attributes],
                                            [a["shape"] for a in attributes], scheme)
  prompts = list(captions) if prompt == "caption" else [""] * num_images
  t0 = time.perf_counter()
  generated = semantic_to_image(bundle, prompts, labels.astype(np.int32), seed=seed,
                                num_steps=num_steps, guidance_scale=guidance_scale,
                                sampler=sampler, batch_size=min(batch_size, num_images),
                                progress_fn=progress)
  seconds = time.perf_counter() - t0
  scores = semantic_scores(generated, labels, scheme, attributes)
  per_example = scores.pop("per_example")
  scores.update(task="semantic", segmentation=scheme, prompt=prompt, seconds=seconds, seed=seed,
                num_steps=num_steps, guidance_scale=guidance_scale, sampler=sampler)
  if out_dir:
    from latent_diffusion_jax.core.images import save_images
    os.makedirs(out_dir, exist_ok=True)
    save_images(generated, out_dir, prompts, dict(scores))
    with open(os.path.join(out_dir, "semantic_fidelity.json"), "w") as f:
      json.dump({**scores, "per_example": per_example}, f, indent=1, default=str)
  return scores
