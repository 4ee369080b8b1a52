"""Placement: does a ControlNet put the shape where its control map says?

Held-out layouts are the 12 (color, shape, position) combinations the shapes training split never
shows, each with fresh geometry (size and offset drawn from `seed`, not from the dataset's). The
prompt names color and shape only ("a red circle"); the control map (outline or segmentation,
data/control.py, drawn from the generator's geometry) is the only source of the position. An image
is placed right when the shape `caption_fidelity.detect` finds lies in the grid cell of the
control map. Sampling the same prompts and seeds without the ControlNet gives the contrast: the
base model then puts the shape wherever it likes (chance is 25%).

  python -m latent_diffusion_jax.cli.placement --controlnet workdirs/demo/controlnet \
      --out workdirs/demo/placement
"""

import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.data import control, shapes
from latent_diffusion_jax.evaluation.caption_fidelity import detect


def held_out_layouts(layouts_per_combination: int, *, kind: str = "outline", channels: int = 3,
                     image_size: int = 32, seed: int = 1000
                     ) -> Tuple[List[str], np.ndarray, List[Dict[str, Any]]]:
  """(prompts without position, control images float32 [N, S, S, C] in [0, 1], attributes).

  Every held-out combination appears `layouts_per_combination` times, each with its own geometry
  (example `i` of the test split drawn with `seed`), so layouts repeat neither combination nor
  placement from training.
  """
  if layouts_per_combination <= 0:
    raise UserInputError(
        f"layouts_per_combination must be positive, got {layouts_per_combination}.")
  prompts, hints, attributes = [], [], []
  index = 0
  for color, shape, position in shapes.combinations("test"):
    for _ in range(layouts_per_combination):
      geometry = shapes.sample_attributes(shapes.example_rng(index, "test", seed), "test")
      index += 1
      attrs = {**geometry, "color": color, "shape": shape, "position": position}
      prompts += control.drop_position([shapes.caption(attrs)])
      hints.append(control.hint_from_coverage(shapes.coverage(attrs, image_size), kind, channels))
      attributes.append(attrs)
  return prompts, np.stack(hints), attributes


def placement_scores(images: np.ndarray | Sequence[np.ndarray],
                     attributes: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
  """Scores generated images against their layouts.

  Returns:
    "placement" (detected cell = the control map's), "color", "shape" (the prompt's words) and
    "placement_and_shape" accuracies in [0, 1], "num_examples", and "per_example" (expected and
    detected attributes).
  """
  if len(images) != len(attributes):
    raise UserInputError(f"Got {len(images)} images but {len(attributes)} layouts.")
  rows = []
  for image, attrs in zip(images, attributes):
    found = detect(np.asarray(image))
    rows.append({"expected": {k: attrs[k] for k in ("color", "shape", "position")},
                 "detected": found,
                 "placement": found["position"] == attrs["position"],
                 "color": found["color"] == attrs["color"],
                 "shape": found["shape"] == attrs["shape"]})
  for row in rows:
    row["placement_and_shape"] = row["placement"] and row["shape"]
  n = len(rows)
  keys = ("placement", "color", "shape", "placement_and_shape")
  return {**{k: (sum(r[k] for r in rows) / n if n else 0.0) for k in keys}, "num_examples": n,
          "per_example": rows}


def evaluate(bundle, controlnet: Optional[Tuple[Any, Any]], *, kind: str = "outline",
             layouts_per_combination: int = 8, control_scale: float = 1.0, seed: int = 1234,
             num_steps: int = 50, guidance_scale: float = 3.0, sampler: str = "ddim",
             out_dir: Optional[str] = None) -> Dict[str, Any]:
  """Samples the held-out layouts with (`controlnet` = (module, params)) or without (None) the
  ControlNet and scores placement; writes images and scores to `out_dir` when given."""
  from latent_diffusion_jax.core.images import save_images
  from latent_diffusion_jax.sampling.generation import generate
  channels = controlnet[0].conditioning_channels if controlnet is not None else 3
  prompts, hints, attributes = held_out_layouts(layouts_per_combination, kind=kind,
                                                channels=channels, image_size=bundle.image_size)
  extra = {}
  if controlnet is not None:
    from latent_diffusion_jax.sampling.controlnet import Control
    extra["controlnets"] = [Control(*controlnet, image=hints, scale=control_scale)]
  t0 = time.perf_counter()
  images = generate(bundle, prompts, seed=seed, num_steps=num_steps, guidance_scale=guidance_scale,
                    sampler=sampler, batch_size=min(len(prompts), 64), **extra)
  seconds = time.perf_counter() - t0
  scores = placement_scores(images, attributes)
  per_example = scores.pop("per_example")
  scores.update(seconds=seconds, seed=seed, num_steps=num_steps, guidance_scale=guidance_scale,
                sampler=sampler, control=kind, controlnet=controlnet is not None,
                control_scale=control_scale if controlnet is not None else 0.0)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    save_images(images, out_dir, prompts, dict(scores))
    with open(os.path.join(out_dir, "placement.json"), "w") as f:
      json.dump({**scores, "per_example": per_example}, f, indent=1, default=str)
  return scores


def run(controlnet_workdir: str, *, base: str = "", out_dir: Optional[str] = None,
        compare_without: bool = True, kind: str = "", **kwargs) -> Dict[str, Any]:
  """Placement of a ControlNet run on its base model, and of the base alone for contrast.

  Args:
    controlnet_workdir: a stage "controlnet" workdir (its EMA params are used).
    base: the base model; "" takes the one the run was trained on (its training.base_checkpoint).
    out_dir: images and scores go to `<out_dir>/controlnet` and `<out_dir>/base`, the summary to
      `<out_dir>/placement_summary.json`.
    compare_without: also sample the same prompts and seeds without the ControlNet.
    kind: the control map ("outline" / "segmentation"); "" takes the run's data.control.
    **kwargs: `evaluate`'s sampling settings.

  Returns:
    {"controlnet": scores[, "base": scores], "base_checkpoint", "controlnet_workdir"}.
  """
  from latent_diffusion_jax.artifacts.loader import Source, load_bundle
  from latent_diffusion_jax.artifacts.workdir import load_controlnet
  from latent_diffusion_jax.core.config import config_from_json
  module, params, info = load_controlnet(controlnet_workdir)
  base = base or info["base_checkpoint"]
  kind = kind or config_from_json(info["config"]).data.control or "outline"
  bundle = load_bundle(Source(base))
  sub = lambda name: os.path.join(out_dir, name) if out_dir else None
  summary = {"controlnet_workdir": controlnet_workdir, "controlnet_step": info["step"],
             "base_checkpoint": base,
             "controlnet": evaluate(bundle, (module, params), kind=kind,
                                    out_dir=sub("controlnet"), **kwargs)}
  if compare_without:
    summary["base"] = evaluate(bundle, None, kind=kind, out_dir=sub("base"), **kwargs)
  if out_dir:
    with open(os.path.join(out_dir, "placement_summary.json"), "w") as f:
      json.dump(summary, f, indent=1, default=str)
  return summary
