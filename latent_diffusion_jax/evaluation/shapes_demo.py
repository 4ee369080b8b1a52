"""Fidelity of a model trained on the embedded shapes dataset, by task:

  caption  text-to-image: generates the held-out (color, shape, position) captions — combinations
           the model never saw in training — and reports color / position / shape accuracy
           (caption_fidelity.py).
  class    class-conditional: generates `--images_per_class` images of each of the 18 classes
           (color x shape) and reports the accuracy of the class read back from the pixels
           (class_fidelity.py), overall and per class.
  layout   layout-to-image: generates the layouts of the held-out "test" split (each holds an
           object whose color, shape and grid cell training never showed) and reports the
           fraction of boxes holding a shape of the requested color and shape (layout_fidelity.py).

  python -m latent_diffusion_jax.evaluation.shapes_demo --checkpoint workdirs/shapes_ldm --out DIR
  python -m latent_diffusion_jax.evaluation.shapes_demo --task class --checkpoint W --out DIR
  python -m latent_diffusion_jax.evaluation.shapes_demo --task layout --checkpoint W --out DIR
"""

import json
import os
import time
from typing import Any, Dict, List, Optional

from absl import app, flags, logging

from latent_diffusion_jax.data import shapes
from latent_diffusion_jax.evaluation.caption_fidelity import caption_fidelity
from latent_diffusion_jax.evaluation.class_fidelity import class_fidelity, class_requests
from latent_diffusion_jax.evaluation.layout_fidelity import layout_fidelity, layout_requests
from latent_diffusion_jax.evaluation.shapes_scores import CAPTION_BARS, headline, summary_line

TASKS = ("caption", "class", "layout")


def held_out_prompts(images_per_combination: int):
  """(prompts, attributes) covering every held-out combination `images_per_combination` times."""
  prompts, attributes = [], []
  for color, shape, position in shapes.combinations("test"):
    attrs = {"color": color, "shape": shape, "position": position}
    prompts += [shapes.caption(attrs)] * images_per_combination
    attributes += [attrs] * images_per_combination
  return prompts, attributes


def _batch_size(n: int) -> int:
  return n if n <= 128 else 64


def evaluate(bundle, *, task: str = "caption", images_per_combination: int = 8,
             images_per_class: int = 8, num_layouts: int = 96, seed: int = 1234,
             num_steps: int = 50, guidance_scale: float = 3.0, sampler: str = "ddim",
             out_dir: Optional[str] = None) -> Dict[str, Any]:
  """Samples the task's held-out conditions and scores them; writes images and scores to `out_dir`."""
  from latent_diffusion_jax.core.errors import UserInputError
  from latent_diffusion_jax.core.images import save_images
  from latent_diffusion_jax.sampling.generation import generate
  if task not in TASKS:
    raise UserInputError(f"Unknown task {task!r}; valid: {', '.join(TASKS)}.")
  settings = dict(seed=seed, num_steps=num_steps, guidance_scale=guidance_scale, sampler=sampler)
  t0 = time.perf_counter()
  if task == "caption":
    prompts, attributes = held_out_prompts(images_per_combination)
    images = generate(bundle, prompts, batch_size=_batch_size(len(prompts)), **settings)
    scores = caption_fidelity(images, attributes)
    names: List[str] = prompts
  elif task == "class":
    labels = class_requests(images_per_class)
    # Text-free models take one empty prompt per image (only their number matters).
    images = generate(bundle, [""] * len(labels), class_labels=labels,
                      batch_size=_batch_size(len(labels)), **settings)
    scores = class_fidelity(images, labels)
    names = [shapes.class_name(label) for label in labels]
  else:
    requests = layout_requests(num_layouts)
    images = generate(bundle, [""] * num_layouts, layouts=requests["layouts"],
                      batch_size=_batch_size(num_layouts), **settings)
    scores = layout_fidelity(images, requests["layout_boxes"], requests["layout_classes"])
    names = [" and ".join(shapes.class_name(c) for _, c in layout)
             for layout in requests["layouts"]]
  seconds = time.perf_counter() - t0
  per_example = scores.pop("per_example")
  scores.update(task=task, seconds=seconds, **settings)
  if out_dir:
    save_images(images, out_dir, names, dict(scores))
    with open(os.path.join(out_dir, f"{task}_fidelity.json"), "w") as f:
      json.dump({**scores, "per_example": per_example}, f, indent=1, default=str)
  return scores


_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Stage-2 workdir to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of the workdir (default: the latest).")
_OUT = flags.DEFINE_string("out", None, "Where to write the images and scores.")
_TASK = flags.DEFINE_enum("task", "caption", TASKS, "What the model is conditioned on.")
_PER_COMBO = flags.DEFINE_integer("images_per_combination", 8,
                                  "caption: images per held-out combination.")
_PER_CLASS = flags.DEFINE_integer("images_per_class", 8, "class: images per class.")
_LAYOUTS = flags.DEFINE_integer("num_layouts", 96, "layout: held-out layouts to generate.")
_STEPS = flags.DEFINE_integer("steps", 50, "DDIM steps.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 3.0, "Classifier-free guidance scale.")
_SEED = flags.DEFINE_integer("seed", 1234, "Sampling seed.")
_MIN_ACCURACY = flags.DEFINE_float(
    "min_accuracy", 0.0, "Exit non-zero when the headline accuracy is below this: color, position "
    "and shape all right (caption; see --caption_bar), class (class), color and shape in the box "
    "(layout).")
_CAPTION_BAR = flags.DEFINE_enum(
    "caption_bar", "all", CAPTION_BARS, "caption: what --min_accuracy checks, all three attributes "
    "or color and position only.")


def main(argv):
  del argv
  from latent_diffusion_jax.core.logs import quiet_libraries
  from latent_diffusion_jax.artifacts.loader import Source, load_bundle
  quiet_libraries()
  if not _CHECKPOINT.value:
    raise app.UsageError("--checkpoint (a stage-2 workdir) is required.")
  bundle = load_bundle(Source(_CHECKPOINT.value, kind="workdir", step=_STEP.value))
  scores = evaluate(bundle, task=_TASK.value, images_per_combination=_PER_COMBO.value,
                    images_per_class=_PER_CLASS.value, num_layouts=_LAYOUTS.value,
                    seed=_SEED.value, num_steps=_STEPS.value, guidance_scale=_GUIDANCE.value,
                    out_dir=_OUT.value)
  logging.info("Scores: %s", scores)
  print(summary_line(scores))
  accuracy = headline(scores, _CAPTION_BAR.value)
  if accuracy < _MIN_ACCURACY.value:
    raise SystemExit(f"accuracy {accuracy:.1%} is below --min_accuracy "
                     f"{_MIN_ACCURACY.value:.0%}")


if __name__ == "__main__":
  app.run(main)
