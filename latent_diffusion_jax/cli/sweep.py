"""Runs a sweep of train.py configs locally, or writes its launch file for a cluster.

  python -m latent_diffusion_jax.cli.sweep --sweep configs/sweeps/shapes_lr.py --root /tmp/lr
  python -m latent_diffusion_jax.cli.sweep --sweep configs/sweeps/shapes_lr.py --root /tmp/lr \
      --parallel 2 --cpu_devices_per_point 1
  python -m latent_diffusion_jax.cli.sweep --sweep configs/sweeps/shapes_lr.py --launch slurm \
      --workdir /shared/lr --nodes 2 --gpus_per_node 8 --out lr.sbatch

Every point is checked against the base config first (unknown keys, wrong value types). A local
run trains each point in `<root>/<index>-<name>`, skips finished points, resumes unfinished ones,
and writes `<root>/summary.csv`, `<root>/summary.md` and `<root>/hparams` (TensorBoard). The exit
status is non-zero when a point failed. docs/SWEEPS.md describes sweep files and launch targets.
"""

import shlex
import sys

from absl import app, flags

from latent_diffusion_jax.cli import errors
from latent_diffusion_jax.core.errors import FlagError
from latent_diffusion_jax.sweeps import launch_files, local_run, spec, summary

_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file, `configs/sweeps/x.py[:arg]`.")
_ROOT = flags.DEFINE_string("root", None, "Local run: the directory holding every point's workdir.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Local run: points trained at once (each on its "
                                 "own share of the CPU cores and of --gpu_ids). SLURM: the array "
                                 "throttle (%N) when > 1.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Check the sweep and print each point's command; "
                             "run and write nothing.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices_per_point", 0, "Local run: XLA CPU devices of "
                                    "each run (--xla_force_host_platform_device_count); 0 keeps "
                                    "XLA_FLAGS as they are.")
_GPU_IDS = flags.DEFINE_list("gpu_ids", [], "Local run: GPUs split evenly among the --parallel "
                             "runs (CUDA_VISIBLE_DEVICES of each).")
_TRAIN_PY = flags.DEFINE_string("train_py", None, "Local run: train.py to run (default: the "
                                "checkout's).")
_LAUNCH = flags.DEFINE_enum("launch", None, list(launch_files.TARGETS),
                            "Write this cluster's launch file instead of running.")
_OUT = flags.DEFINE_string("out", None, "Launch file path; default: print it.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Launch: the workdir root on the cluster's shared "
                               "storage (default: --root).")
_NODES = flags.DEFINE_integer("nodes", 1, "Launch: hosts (processes) per point.")
_GPUS = flags.DEFINE_integer("gpus_per_node", 0, "Launch: GPUs per host (slurm, jobset).")
_PORT = flags.DEFINE_integer("coordinator_port", 1234, "Launch: port of process 0's coordinator.")
_REPO_DIR = flags.DEFINE_string("repo_dir", ".", "Launch: the repository checkout on the cluster "
                                "(the container's working directory for jobset).")
_PYTHON = flags.DEFINE_string("python", None, "Python interpreter (local default: this one; "
                              "launch default: python).")
_JOB_NAME = flags.DEFINE_string("job_name", "", "Launch: job name (default sweep-<sweep name>).")
_IMAGE = flags.DEFINE_string("image", "", "jobset: the container image.")
_TPU_NAME = flags.DEFINE_string("tpu_name", "", "tpu: the TPU VM's name.")
_ZONE = flags.DEFINE_string("zone", "", "tpu: the TPU VM's zone.")
_PROJECT = flags.DEFINE_string("project", "", "tpu: Google Cloud project (default: gcloud's).")
_PARTITION = flags.DEFINE_string("partition", "", "slurm: partition.")
_TIME = flags.DEFINE_string("time", "", "slurm: time limit per point (e.g. 24:00:00).")


def write_launch_file(sweep: spec.Sweep) -> None:
  options = launch_files.LaunchOptions(
      target=_LAUNCH.value, workdir_root=_WORKDIR.value or _ROOT.value or "", nodes=_NODES.value,
      gpus_per_node=_GPUS.value, coordinator_port=_PORT.value, repo_dir=_REPO_DIR.value,
      python=_PYTHON.value or "python", job_name=_JOB_NAME.value, image=_IMAGE.value,
      tpu_name=_TPU_NAME.value, zone=_ZONE.value, project=_PROJECT.value,
      partition=_PARTITION.value, time_limit=_TIME.value,
      max_parallel=_PARALLEL.value if _PARALLEL.value > 1 else 0)
  text = launch_files.launch_file(sweep, options)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text)
    print(f"wrote {_OUT.value}: {_LAUNCH.value} launch of {len(sweep.points)} points")
  else:
    sys.stdout.write(text)


def run_locally(sweep: spec.Sweep) -> int:
  if not _ROOT.value:
    raise FlagError("A local sweep needs --root (or --launch to write a launch file).")
  if _PARALLEL.value < 1:
    raise FlagError(f"--parallel={_PARALLEL.value}; it must be at least 1.")
  options = local_run.LocalOptions(
      root=_ROOT.value, parallel=_PARALLEL.value, python=_PYTHON.value or sys.executable,
      train_py=_TRAIN_PY.value or local_run.default_train_py(),
      cpu_devices_per_point=_CPU_DEVICES.value, gpu_ids=tuple(_GPU_IDS.value))
  if _DRY_RUN.value:
    for p in sweep.points:
      workdir = local_run.workdir_of(options.root, p)
      state = "finished" if local_run.is_finished(p, workdir) else "to run"
      print(f"# point {p.dirname} ({state})\n"
            + shlex.join(local_run.command(sweep, p, workdir, options.python, options.train_py)))
    return 0
  results = local_run.run_sweep(sweep, options)
  paths = summary.write_summary(options.root, results, sweep.name)
  with open(paths["md"]) as f:
    print(f.read(), end="")
  print(f"wrote {paths['csv']}, {paths['md']} and {paths['hparams']} "
        f"(tensorboard --logdir {paths['hparams']})")
  failed = [r.point.dirname for r in results if r.status != local_run.DONE]
  if failed:
    print(f"{len(failed)} point(s) did not finish: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


@errors.exits_on_user_error("sweep")
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _SWEEP.value:
    raise FlagError("--sweep is required (a file like configs/sweeps/shapes_lr.py).")
  sweep = spec.load_sweep(_SWEEP.value)
  if _LAUNCH.value:
    write_launch_file(sweep)
    return 0
  return run_locally(sweep)


if __name__ == "__main__":
  app.run(main)
