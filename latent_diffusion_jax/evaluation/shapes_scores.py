"""What the shapes_demo command prints and checks of its scores: the one-line summary per task
and the accuracy `--min_accuracy` holds it to. Kept apart from the command, whose absl flags would
clash with other commands' imported into the same process."""

from typing import Any, Dict

from latent_diffusion_jax.data import shapes


def summary_line(scores: Dict[str, Any]) -> str:
  """The one-line result the command prints."""
  task, n = scores["task"], scores["num_examples"]
  if task == "caption":
    return (f"Caption fidelity on {n} images of {len(shapes.combinations('test'))} held-out "
            f"caption combinations: color {scores['color']:.1%}, position {scores['position']:.1%}, "
            f"color+position {scores['color_and_position']:.1%}, shape {scores['shape']:.1%}, "
            f"all three {scores['all']:.1%}")
  if task == "class":
    worst = min(scores["per_class"].items(), key=lambda kv: kv[1])
    return (f"Class fidelity on {n} images of {shapes.NUM_CLASSES} classes: class (color and shape) "
            f"{scores['accuracy']:.1%}, color {scores['color']:.1%}, shape {scores['shape']:.1%}; "
            f"worst class {worst[0]} {worst[1]:.1%}")
  return (f"Layout fidelity on {scores['num_boxes']} boxes of {n} held-out layouts: color and "
          f"shape in the box {scores['accuracy']:.1%}, color in the box {scores['color']:.1%}, "
          f"any shape in the box {scores['present']:.1%}; layouts all right "
          f"{scores['layouts_all_right']:.1%}")


CAPTION_BARS = ("all", "color_and_position")


def headline(scores: Dict[str, Any], caption_bar: str = "all") -> float:
  """The accuracy --min_accuracy checks: for captions the share of images with all three
  attributes right (or, with caption_bar="color_and_position", color and position only), class
  (class), color and shape in the box (layout)."""
  if scores["task"] != "caption":
    return scores["accuracy"]
  if caption_bar not in CAPTION_BARS:
    raise ValueError(f"caption_bar must be one of {CAPTION_BARS}, got {caption_bar!r}")
  return scores[caption_bar]
