"""Process-wide settings around the run driver (training/driver.py), which runs `config.stage`.

Before the driver starts, in this order: the compute dtype is checked, the multi-process runtime
starts (from `config.distributed`, or cluster auto-detection; before any other JAX call), and the
workdir is checked to be writable, so these faults end the run at once with a message instead of
failing later or hanging.
"""

import os

import ml_collections as mc
from absl import logging

from latent_diffusion_jax.core import logs, parallel
from latent_diffusion_jax.core.errors import StorageError, UserInputError


def check_precision(config: mc.ConfigDict) -> None:
  """Refuses float16 training.

  float16's 5-bit exponent makes small gradients underflow to 0 and large ones overflow without
  loss scaling, which these trainers do not implement; bfloat16 has float32's range, needs none,
  and costs the same memory and speed on hardware that has it.

  Raises:
    ValueError: for model.dtype or model.param_dtype "float16".
  """
  for key in ("dtype", "param_dtype"):
    if str(config.model.get(key, "float32")) == "float16":
      raise UserInputError(
          f"model.{key}='float16' is refused for training: without dynamic loss scaling fp16 "
          "gradients underflow or overflow and the run silently diverges. Use "
          f"--config.model.{key}=bfloat16 (same memory, float32's range); float16 remains fine "
          "for sampling and export.")


def start_distributed(config: mc.ConfigDict) -> None:
  """Starts JAX's multi-process runtime from `config.distributed` (all empty: auto-detect).

  Raises:
    ValueError: when a coordinator address is given without num_processes and process_id.
  """
  d = config.get("distributed") or mc.ConfigDict()
  address = d.get("coordinator_address", "") or None
  num_processes = d.get("num_processes", 0) or None
  process_id = d.get("process_id", -1)
  process_id = None if process_id is None or process_id < 0 else process_id
  if address is not None and (num_processes is None or process_id is None):
    raise UserInputError(f"distributed.coordinator_address={address!r} also needs "
                     "distributed.num_processes (the same on every process) and "
                     "distributed.process_id (0 .. num_processes-1, its own on each).")
  if num_processes is not None and num_processes > 1 and d.get("cpu_collectives", ""):
    import jax
    # Must precede the CPU client's creation; without it CPU processes cannot all-reduce.
    jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
  parallel.initialize_distributed(address, num_processes, process_id)


def check_workdir(workdir: str) -> None:
  """Creates `workdir` and writes a probe file there, so an unusable one fails at start.

  Raises:
    StorageError: naming the workdir, when it cannot be created or written.
  """
  import jax
  probe = os.path.join(workdir, f".write_probe.{jax.process_index()}.{os.getpid()}")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise StorageError(f"workdir {workdir} cannot be created or written ({type(e).__name__}: "
                          f"{e}); choose a writable directory with free space.") from e


def run_training(config: mc.ConfigDict, workdir: str) -> dict:
  """Trains the stage `config.stage` names (training/stages/) in `workdir` with the run driver."""
  logs.quiet_libraries()
  check_precision(config)
  start_distributed(config)
  check_workdir(workdir)
  from latent_diffusion_jax.training import driver  # heavy (models, data readers): after the checks
  result = driver.train(config, workdir)
  logging.info("Finished at step %d%s", result["step"], " (preempted)" if result["preempted"] else "")
  return result
