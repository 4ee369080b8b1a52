"""Trains a model described by a config file; the config says which stage.

  python train.py --config configs/shapes_ldm.py --workdir workdirs/shapes_ldm
  python train.py --config configs/sd15.py:tiny --workdir /tmp/run --config.training.num_steps=10

Overrides use `--config.<key>=<value>`. A workdir with a checkpoint resumes where it stopped.
"""

from absl import app, flags
from ml_collections import config_flags

from latent_diffusion_jax.training.run import run_training

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  run_training(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
