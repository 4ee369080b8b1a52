"""Caption fidelity of a text-to-image run on the embedded shapes dataset.

Generates images for the held-out (color, shape, position) combinations — captions the model never
saw in training — detects each image's shape color and position from its pixels, and reports the
accuracy.

  python -m latent_diffusion_jax.evaluation.shapes_demo --checkpoint workdirs/shapes_ldm --out DIR
"""

import json
import os
import time
from typing import Any, Dict, Optional

from absl import app, flags, logging

from latent_diffusion_jax.data import shapes
from latent_diffusion_jax.evaluation.caption_fidelity import caption_fidelity


def held_out_prompts(images_per_combination: int):
  """(prompts, attributes) covering every held-out combination `images_per_combination` times."""
  prompts, attributes = [], []
  for color, shape, position in shapes.combinations("test"):
    attrs = {"color": color, "shape": shape, "position": position}
    prompts += [shapes.caption(attrs)] * images_per_combination
    attributes += [attrs] * images_per_combination
  return prompts, attributes


def evaluate(bundle, *, images_per_combination: int = 8, seed: int = 1234, num_steps: int = 50,
             guidance_scale: float = 3.0, sampler: str = "ddim",
             out_dir: Optional[str] = None) -> Dict[str, Any]:
  """Samples the held-out captions and scores them; writes images and scores to `out_dir`."""
  from latent_diffusion_jax.core.images import save_images
  from latent_diffusion_jax.sampling.generation import generate
  prompts, attributes = held_out_prompts(images_per_combination)
  t0 = time.perf_counter()
  images = generate(bundle, prompts, seed=seed, num_steps=num_steps, guidance_scale=guidance_scale,
                    sampler=sampler, batch_size=len(prompts) if len(prompts) <= 128 else 64)
  seconds = time.perf_counter() - t0
  scores = caption_fidelity(images, attributes)
  per_example = scores.pop("per_example")
  scores.update(seconds=seconds, seed=seed, num_steps=num_steps, guidance_scale=guidance_scale,
                sampler=sampler)
  if out_dir:
    save_images(images, out_dir, prompts, {k: v for k, v in scores.items()})
    with open(os.path.join(out_dir, "caption_fidelity.json"), "w") as f:
      json.dump({**scores, "per_example": per_example}, f, indent=1, default=str)
  return scores


_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Stage-2 workdir to evaluate.")
_OUT = flags.DEFINE_string("out", None, "Where to write the images and scores.")
_PER_COMBO = flags.DEFINE_integer("images_per_combination", 8, "Images per held-out combination.")
_STEPS = flags.DEFINE_integer("steps", 50, "DDIM steps.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 3.0, "Classifier-free guidance scale.")
_SEED = flags.DEFINE_integer("seed", 1234, "Sampling seed.")
_MIN_ACCURACY = flags.DEFINE_float("min_accuracy", 0.0,
                                   "Exit non-zero when color-and-position accuracy is below this.")


def main(argv):
  del argv
  from latent_diffusion_jax.core.logs import quiet_libraries
  from latent_diffusion_jax.artifacts.loader import Source, load_bundle
  quiet_libraries()
  if not _CHECKPOINT.value:
    raise app.UsageError("--checkpoint (a stage-2 workdir) is required.")
  bundle = load_bundle(Source(_CHECKPOINT.value, kind="workdir"))
  scores = evaluate(bundle, images_per_combination=_PER_COMBO.value, seed=_SEED.value,
                    num_steps=_STEPS.value, guidance_scale=_GUIDANCE.value, out_dir=_OUT.value)
  logging.info("Scores: %s", scores)
  n = scores["num_examples"]
  print(f"Caption fidelity on {n} images of {len(shapes.combinations('test'))} held-out "
        f"caption combinations: color {scores['color']:.1%}, position {scores['position']:.1%}, "
        f"color+position {scores['color_and_position']:.1%}, shape {scores['shape']:.1%}")
  if scores["color_and_position"] < _MIN_ACCURACY.value:
    raise SystemExit(f"color+position accuracy {scores['color_and_position']:.1%} is below "
                     f"--min_accuracy {_MIN_ACCURACY.value:.0%}")


if __name__ == "__main__":
  app.run(main)
