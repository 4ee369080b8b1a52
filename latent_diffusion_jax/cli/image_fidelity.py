"""Fidelity of an image-conditioned run on the held-out shapes (issue 14's measurements):

  python -m latent_diffusion_jax.cli.image_fidelity --task inpaint --checkpoint WORKDIR --out DIR
  python -m latent_diffusion_jax.cli.image_fidelity --task sr --checkpoint WORKDIR --out DIR
  python -m latent_diffusion_jax.cli.image_fidelity --task semantic --checkpoint WORKDIR --out DIR

inpaint: evaluation/inpaint_fidelity.py (an inpainting model, or a text-to-image one by
re-noising); sr: evaluation/sr_fidelity.py; semantic: evaluation/semantic_fidelity.py. Prints a
table, writes `<out>/<task>_fidelity.json` and the images, and exits non-zero when a given bar
(--min_fidelity, --max_outside_gap_db, --min_agreement, --require_beats_bicubic) is missed.
"""

import sys

from absl import app, flags

from latent_diffusion_jax.cli import errors

TASKS = ("inpaint", "sr", "semantic")

_TASK = flags.DEFINE_enum("task", None, TASKS, "What to measure.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "The run's training workdir.")
_OUT = flags.DEFINE_string("out", None, "Where to write images and scores.")
_NUM = flags.DEFINE_integer("num_images", 96, "Held-out test images.")
_STEPS = flags.DEFINE_integer("steps", 50, "Sampler steps.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 3.0, "Classifier-free guidance scale.")
_SAMPLER = flags.DEFINE_string("sampler", "ddim", "Sampler.")
_SEED = flags.DEFINE_integer("seed", 1234, "Sampling seed.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per sampling batch.")
_QUADRANT = flags.DEFINE_string("quadrant", "shape", "inpaint: the masked quadrant: 'shape' (the "
                                "one holding the shape) or 'top left', ... .")
_STRENGTH = flags.DEFINE_float("strength", 1.0, "inpaint: strength in (0, 1].")
_KEEP_UNMASKED = flags.DEFINE_boolean(
    "keep_unmasked", False, "inpaint: composite the results over the inputs (sample.py "
    "--keep_unmasked), so kept pixels are the input's; the model's own outside-mask PSNR is "
    "still reported (psnr_outside_model).")
_NOISE_LEVEL = flags.DEFINE_integer("noise_level", 20, "sr: the low-res image's noise level.")
_PROMPT = flags.DEFINE_enum("prompt", "caption", ["caption", "empty"],
                            "semantic: each map's caption, or '' for all.")
_MIN_FIDELITY = flags.DEFINE_float("min_fidelity", 0.0, "inpaint: fail below this color-and-shape "
                                   "accuracy; sr: below this detector agreement.")
_MAX_GAP = flags.DEFINE_float("max_outside_gap_db", None, "inpaint: fail when the outside-mask "
                              "PSNR falls more than this many dB below the reconstruction's.")
_BEATS = flags.DEFINE_bool("require_beats_bicubic", False,
                           "sr: fail unless PSNR and SSIM are both above bicubic's.")
_MIN_AGREEMENT = flags.DEFINE_float("min_agreement", 0.0,
                                    "semantic: fail below this shape-pixel color agreement.")
flags.mark_flags_as_required(["task", "checkpoint"])

_ROWS = {
    "inpaint": (("color", "%"), ("shape", "%"), ("position", "%"), ("color_and_shape", "%"),
                ("psnr_outside", "dB"), ("psnr_outside_reconstruction", "dB"),
                ("outside_gap_db", "dB"), ("psnr_outside_model", "dB")),
    "sr": (("psnr", "dB"), ("psnr_bicubic", "dB"), ("ssim", ""), ("ssim_bicubic", ""),
           ("detector_agreement", "%"), ("detector_agreement_bicubic", "%")),
    "semantic": (("shape_agreement", "%"), ("background_agreement", "%"),
                 ("pixel_agreement", "%")),
}


def table(task: str, scores: dict) -> str:
  """The scores of `task` as an aligned two-column text table."""
  lines = [f"{task} fidelity on {scores['num_examples']} held-out images "
           f"({scores['seconds']:.0f} s sampling)"]
  for key, unit in _ROWS[task]:
    value = scores[key]
    text = f"{value:.1%}" if unit == "%" else f"{value:.2f}{(' ' + unit) if unit else ''}"
    lines.append(f"  {key:<30} {text:>10}")
  return "\n".join(lines)


def failures(task: str, scores: dict) -> list:
  """The bars the scores miss, as messages."""
  out = []
  if task == "inpaint":
    if scores["color_and_shape"] < _MIN_FIDELITY.value:
      out.append(f"color_and_shape {scores['color_and_shape']:.1%} < --min_fidelity "
                 f"{_MIN_FIDELITY.value:.0%}")
    if _MAX_GAP.value is not None and scores["outside_gap_db"] > _MAX_GAP.value:
      out.append(f"outside_gap_db {scores['outside_gap_db']:.2f} > --max_outside_gap_db "
                 f"{_MAX_GAP.value}")
  elif task == "sr":
    if scores["detector_agreement"] < _MIN_FIDELITY.value:
      out.append(f"detector_agreement {scores['detector_agreement']:.1%} < --min_fidelity "
                 f"{_MIN_FIDELITY.value:.0%}")
    if _BEATS.value and not scores["beats_bicubic"]:
      out.append("PSNR and SSIM are not both above bicubic's")
  elif scores["shape_agreement"] < _MIN_AGREEMENT.value:
    out.append(f"shape_agreement {scores['shape_agreement']:.1%} < --min_agreement "
               f"{_MIN_AGREEMENT.value:.0%}")
  return out


@errors.exits_on_user_error("image_fidelity")
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from latent_diffusion_jax.artifacts.loader import Source, load_bundle
  from latent_diffusion_jax.core.logs import quiet_libraries
  quiet_libraries()
  task = _TASK.value
  print(f"image_fidelity: loading {_CHECKPOINT.value}", flush=True)
  bundle = load_bundle(Source(_CHECKPOINT.value, kind="workdir"))

  def progress(done, total, count):
    print(f"image_fidelity: {task}: batch {done}/{total} sampled ({count} images)", flush=True)

  common = dict(num_images=_NUM.value, seed=_SEED.value, num_steps=_STEPS.value,
                guidance_scale=_GUIDANCE.value, sampler=_SAMPLER.value,
                batch_size=_BATCH.value, out_dir=_OUT.value, progress=progress)
  if task == "inpaint":
    from latent_diffusion_jax.evaluation import inpaint_fidelity
    scores = inpaint_fidelity.evaluate(bundle, quadrant=_QUADRANT.value,
                                       strength=_STRENGTH.value,
                                       keep_unmasked=_KEEP_UNMASKED.value, **common)
  elif task == "sr":
    from latent_diffusion_jax.evaluation import sr_fidelity
    scores = sr_fidelity.evaluate(bundle, noise_level=_NOISE_LEVEL.value, **common)
  else:
    from latent_diffusion_jax.evaluation import semantic_fidelity
    scores = semantic_fidelity.evaluate(bundle, prompt=_PROMPT.value, **common)
  print(table(task, scores), flush=True)
  missed = failures(task, scores)
  if missed:
    sys.exit("image_fidelity: below the bar: " + "; ".join(missed))


if __name__ == "__main__":
  app.run(main)
