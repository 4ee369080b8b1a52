"""Trains a model described by a config file; the config says which stage.

  python train.py --config configs/shapes_ldm.py --workdir workdirs/shapes_ldm
  python train.py --config configs/sd15.py:tiny --workdir /tmp/run --config.training.num_steps=10

Overrides use `--config.<key>=<value>`. A workdir with a checkpoint resumes where it stopped;
SIGTERM saves a checkpoint and exits 0. Several processes (hosts) run the same command with
`--config.distributed.coordinator_address=HOST:PORT --config.distributed.num_processes=N
--config.distributed.process_id=I` (or nothing, where JAX detects the cluster: TPU pods, SLURM).
"""

from latent_diffusion_jax.cli import huge_pages

if __name__ == "__main__":  # before the heavy imports: see cli/huge_pages.py
  huge_pages.reexec_with_huge_pages()

import errno
import sys

from absl import app, flags
from ml_collections import config_flags

from latent_diffusion_jax.cli import errors
from latent_diffusion_jax.training.run import run_training

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.mark_flags_as_required(["config", "workdir"])
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.ENOTDIR)


@errors.exits_on_user_error("train.py")
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    run_training(_CONFIG.value, _WORKDIR.value)
  except OSError as e:
    if e.errno not in _STORAGE_ERRNOS:
      raise
    # A full disk or read-only storage anywhere in the workdir (TensorBoard files, caches): the
    # message names the file; a traceback would add nothing.
    sys.exit(f"train.py: {type(e).__name__}: {e}")


if __name__ == "__main__":
  app.run(main)
