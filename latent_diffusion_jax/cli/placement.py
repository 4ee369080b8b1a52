"""Placement of a ControlNet on the embedded shapes (evaluation/placement.py), with and without it.

  python -m latent_diffusion_jax.cli.placement --controlnet workdirs/demo/controlnet \
      --out workdirs/demo/placement
"""

from absl import app, flags

from latent_diffusion_jax.cli import errors

_CONTROLNET = flags.DEFINE_string("controlnet", None, "A ControlNet training workdir.")
_BASE = flags.DEFINE_string("base", "", "The base model; default: the one the ControlNet was "
                            "trained on (its training.base_checkpoint).")
_OUT = flags.DEFINE_string("out", None, "Where to write images and scores.")
_CONTROL = flags.DEFINE_string("control", "", "outline or segmentation; default: the run's "
                               "data.control.")
_PER_COMBO = flags.DEFINE_integer("layouts_per_combination", 8,
                                  "Layouts per held-out (color, shape, position) combination.")
_STEPS = flags.DEFINE_integer("steps", 50, "DDIM steps.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 3.0, "Classifier-free guidance scale.")
_SCALE = flags.DEFINE_float("control_scale", 1.0, "ControlNet conditioning scale.")
_SEED = flags.DEFINE_integer("seed", 1234, "Sampling seed.")
_WITHOUT = flags.DEFINE_bool("compare_without", True,
                             "Also sample without the ControlNet (the base model alone).")
_MIN = flags.DEFINE_float("min_placement", 0.0,
                          "Exit non-zero when placement with the ControlNet is below this.")
flags.mark_flags_as_required(["controlnet"])


@errors.exits_on_user_error("placement")
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from latent_diffusion_jax.core.logs import quiet_libraries
  from latent_diffusion_jax.evaluation.placement import run
  quiet_libraries()
  summary = run(_CONTROLNET.value, base=_BASE.value, out_dir=_OUT.value,
                compare_without=_WITHOUT.value, kind=_CONTROL.value,
                layouts_per_combination=_PER_COMBO.value, control_scale=_SCALE.value,
                seed=_SEED.value, num_steps=_STEPS.value, guidance_scale=_GUIDANCE.value)
  for name in ("controlnet", "base"):
    if name in summary:
      s = summary[name]
      print(f"{name}: placement {s['placement']:.1%}, color {s['color']:.1%}, shape "
            f"{s['shape']:.1%} on {s['num_examples']} held-out layouts ({s['seconds']:.0f} s)")
  if summary["controlnet"]["placement"] < _MIN.value:
    raise SystemExit(f"placement {summary['controlnet']['placement']:.1%} is below "
                     f"--min_placement {_MIN.value:.0%}")


if __name__ == "__main__":
  app.run(main)
