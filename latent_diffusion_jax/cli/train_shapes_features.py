"""Trains the shapes feature network (evaluation/feature_nets/shapes.py) and writes its weights.

  python -m latent_diffusion_jax.cli.train_shapes_features --out weights/shapes_features.msgpack

About a minute on 2 CPU cores; prints the held-out accuracy of each attribute head.
"""

import json

from absl import app, flags

from latent_diffusion_jax.cli import errors
from latent_diffusion_jax.evaluation.feature_nets import shapes

_OUT = flags.DEFINE_string("out", shapes.DEFAULT_WEIGHTS, "Where to write the weights (.msgpack).")
_STEPS = flags.DEFINE_integer("steps", 500, "Training steps (batch 128).")
_SEED = flags.DEFINE_integer("seed", 0, "Initialization and batch order seed.")


@errors.exits_on_user_error("train_shapes_features")
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  result = shapes.train(steps=_STEPS.value, seed=_SEED.value)
  shapes.save(_OUT.value, result.params, result.accuracy)
  print(json.dumps({"out": _OUT.value, "held_out_accuracy": result.accuracy,
                    "seconds": round(result.seconds, 1)}))


if __name__ == "__main__":
  app.run(main)
