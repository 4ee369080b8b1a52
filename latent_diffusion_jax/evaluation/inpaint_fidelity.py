"""Inpainting fidelity on the held-out shapes: one quadrant masked, the caption naming what belongs
there.

Each held-out test image (shapes "test" split: combinations never seen in training) gets one
quadrant of its 2x2 grid masked: by default the quadrant holding the shape, so the model must
paint the captioned shape back; or a chosen quadrant, which for images whose shape lies elsewhere
must stay empty. The prompt is the image's caption. Scores:

  color, shape, position  `caption_fidelity.detect` on the filled quadrant alone (pixels outside
                          the mask set to the background) matches the caption's attributes (or
                          finds nothing when the masked quadrant should be empty)
  color_and_shape         both right: the issue's bar is >= 80%
  psnr_outside            PSNR of the pixels outside the mask against the input image, beside
  psnr_outside_reconstruction  the same PSNR of the first stage's reconstruction of the input:
                          the bar is that inpainting changes the kept pixels at most as much as
                          the autoencoder does (outside_gap_db = reconstruction - inpainted <= 0)

An inpainting model (9-channel UNet) sees the mask; any text-to-image model inpaints by re-noising
the known region (`sampling.image_conditioned`).
"""

import json
import os
import time
from typing import Any, Dict, Optional, Sequence

import numpy as np

from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.data import shapes
from latent_diffusion_jax.evaluation import held_out_images
from latent_diffusion_jax.evaluation.caption_fidelity import ATTRIBUTES, NONE, detect

QUADRANTS = ("shape",) + shapes.POSITIONS


def quadrant_masks(attributes: Sequence[Dict[str, Any]], image_size: int,
                   quadrant: str = "shape") -> np.ndarray:
  """uint8 masks [N, S, S] (255 = repaint): the quadrant holding each shape ("shape") or the
  named one ("top left", ...)."""
  if quadrant not in QUADRANTS:
    raise UserInputError(f"Unknown quadrant {quadrant!r}; valid: {', '.join(QUADRANTS)}.")
  half = image_size // 2
  masks = np.zeros((len(attributes), image_size, image_size), np.uint8)
  for i, attrs in enumerate(attributes):
    cell = shapes.POSITIONS.index(attrs["position"] if quadrant == "shape" else quadrant)
    row, col = divmod(cell, 2)
    masks[i, row * half:(row + 1) * half, col * half:(col + 1) * half] = 255
  return masks


def inpaint_scores(generated: np.ndarray, originals: np.ndarray, reconstructions: np.ndarray,
                   masks: np.ndarray, attributes: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
  """Scores inpainted uint8 images [N, S, S, 3] against their inputs.

  Args:
    generated: the inpainted images.
    originals: the input images.
    reconstructions: the first stage's reconstructions of the inputs.
    masks: [N, S, S] (nonzero = repainted).
    attributes: the captions' attributes; the expected content of the masked region is the
      caption's shape when the mask holds the shape's quadrant, else nothing.

  Returns:
    accuracies "color", "shape", "position", "color_and_shape", "all"; mean "psnr_outside",
    "psnr_outside_reconstruction", "outside_gap_db" (reconstruction minus inpainted PSNR: <= 0
    meets the bar); "num_examples"; "per_example" rows.
  """
  n = len(generated)
  if not (len(originals) == len(reconstructions) == len(masks) == len(attributes) == n):
    raise UserInputError("inpaint_scores needs as many originals, reconstructions, masks and "
                         f"attribute sets as images ({n}).")
  repaint = np.asarray(masks) > 0
  psnr_gen = held_out_images.masked_psnr(generated, originals, ~repaint)
  psnr_rec = held_out_images.masked_psnr(reconstructions, originals, ~repaint)
  size = repaint.shape[1]
  rows = []
  for i in range(n):
    filled = np.where(repaint[i][..., None], np.asarray(generated[i]), np.uint8(0))
    found = detect(filled.astype(np.uint8))
    cell = _cell_of(repaint[i], size)
    holds_shape = cell == attributes[i]["position"]
    expected = ({k: attributes[i][k] for k in ATTRIBUTES} if holds_shape
                else {k: NONE for k in ATTRIBUTES})
    right = {k: found[k] == expected[k] for k in ATTRIBUTES}
    rows.append({"expected": expected, "detected": found, **right,
                 "color_and_shape": right["color"] and right["shape"],
                 "all": all(right.values()), "psnr_outside": float(psnr_gen[i]),
                 "psnr_outside_reconstruction": float(psnr_rec[i])})
  keys = ("color", "shape", "position", "color_and_shape", "all", "psnr_outside",
          "psnr_outside_reconstruction")
  scores = held_out_images.summary_rows(rows, keys)
  scores["outside_gap_db"] = scores["psnr_outside_reconstruction"] - scores["psnr_outside"]
  return {**scores, "num_examples": n, "per_example": rows}


def _cell_of(mask: np.ndarray, size: int) -> Optional[str]:
  """The grid cell a mask covers most."""
  half = size // 2
  shares = [mask[r * half:(r + 1) * half, c * half:(c + 1) * half].mean()
            for r in range(2) for c in range(2)]
  return shapes.POSITIONS[int(np.argmax(shares))]


def evaluate(bundle, *, num_images: int = 96, quadrant: str = "shape", seed: int = 1234,
             num_steps: int = 50, guidance_scale: float = 3.0, sampler: str = "ddim",
             strength: float = 1.0, keep_unmasked: bool = False, batch_size: int = 64,
             out_dir: Optional[str] = None, progress=None) -> Dict[str, Any]:
  """Inpaints held-out test images with `bundle` (an inpainting or a text-to-image model) and
  scores them; writes images and scores (inpaint_fidelity.json) to `out_dir` when given.
  `keep_unmasked`: composite the results over the inputs (`image_conditioned.generate_from_images`);
  the outside-mask PSNR is then that of identical pixels (100 dB) and the model's own is reported
  as "psnr_outside_model"."""
  from latent_diffusion_jax.sampling.image_conditioned import composite_unmasked, inpaint, mode_for
  size = bundle.image_size
  images, captions, attributes = held_out_images.held_out_examples(num_images, size)
  masks = quadrant_masks(attributes, size, quadrant)
  mode = mode_for(bundle, init_image=True, mask=True)
  t0 = time.perf_counter()
  model_output = inpaint(bundle, captions, images, masks, strength=strength, seed=seed,
                         num_steps=num_steps, guidance_scale=guidance_scale, sampler=sampler,
                         batch_size=min(batch_size, num_images), progress_fn=progress)
  seconds = time.perf_counter() - t0
  # The masks are binary (0 / 255): the composite of uint8 images stays exact.
  generated = (composite_unmasked(model_output, images, masks / 255.0).astype(np.uint8)
               if keep_unmasked else model_output)
  reconstructions = held_out_images.reconstruct(bundle, images)
  scores = inpaint_scores(generated, images, reconstructions, masks, attributes)
  per_example = scores.pop("per_example")
  outside = ~(np.asarray(masks) > 0)
  scores.update(task="inpaint", mode=mode, quadrant=quadrant, seconds=seconds, seed=seed,
                num_steps=num_steps, guidance_scale=guidance_scale, sampler=sampler,
                strength=strength, keep_unmasked=keep_unmasked,
                psnr_outside_model=float(np.mean(
                    held_out_images.masked_psnr(model_output, images, outside))))
  if out_dir:
    from latent_diffusion_jax.core.images import save_images
    os.makedirs(out_dir, exist_ok=True)
    save_images(generated, out_dir, captions, dict(scores))
    with open(os.path.join(out_dir, "inpaint_fidelity.json"), "w") as f:
      json.dump({**scores, "per_example": per_example}, f, indent=1, default=str)
  return scores
