"""Runs a sweep's points on this machine, each as the train.py command a user could type.

Every point trains in `<root>/<index>-<name>/`, where this writes before training:
  overrides.json   the point's overrides
  config.json      the config train.py resolves from the base config and the overrides
  command.txt      the exact command line
and after it `sweep_point.json` (status, return code, final step, wall time); train.py's output
goes to `train.log` there. A point whose run recorded its final step (the latest committed
checkpoint is training.num_steps) is skipped on a rerun; any other resumes, since train.py resumes
from its workdir. A failed point is reported and the others go on.

Several points run at once with `parallel > 1`. Each running point holds a slot; slot i gets the
i-th of `parallel` equal, disjoint shares of this process's CPU cores (its threads are pinned there
and OMP/TF thread counts set to the share's size), and, with `gpu_ids`, the i-th equal share of
those GPUs as CUDA_VISIBLE_DEVICES. `cpu_devices_per_point` sets XLA's fake CPU device count of each
run (--xla_force_host_platform_device_count); 0 keeps the inherited XLA_FLAGS.
"""

import concurrent.futures
import dataclasses
import json
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

from latent_diffusion_jax.checkpoints.checkpointer import checkpoint_dir
from latent_diffusion_jax.core.config import config_to_json
from latent_diffusion_jax.core.errors import InputFileError, MissingInputError
from latent_diffusion_jax.sweeps.spec import Point, Sweep

RECORD = "sweep_point.json"
DONE, FAILED, INCOMPLETE = "done", "failed", "incomplete"


def default_train_py() -> str:
  """train.py of the checkout this package runs from."""
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return os.path.join(repo, "train.py")


@dataclasses.dataclass(frozen=True)
class LocalOptions:
  root: str
  parallel: int = 1
  python: str = sys.executable
  train_py: str = dataclasses.field(default_factory=default_train_py)
  cpu_devices_per_point: int = 0
  gpu_ids: Sequence[str] = ()


@dataclasses.dataclass
class Result:
  point: Point
  workdir: str
  status: str
  wall_time_s: float
  final_step: Optional[int]
  returncode: Optional[int] = None
  # Finished by an earlier invocation: not trained again.
  skipped: bool = False


def workdir_of(root: str, point: Point) -> str:
  return os.path.join(root, point.dirname)


def command(sweep: Sweep, point: Point, workdir: str, python: str, train_py: str) -> List[str]:
  """The train.py command of one point on this machine."""
  return [python, train_py, f"--config={sweep.local_base_config}", f"--workdir={workdir}",
          *point.flags()]


def latest_step(workdir: str) -> Optional[int]:
  """The run's newest committed checkpoint step, or None (Orbax's step names, without opening a
  CheckpointManager: unfinished saves keep temporary names and are not counted)."""
  import orbax.checkpoint as ocp  # only when a point has run
  directory = checkpoint_dir(workdir)
  if not directory.is_dir():
    return None
  steps = [m.step for m in ocp.step.standard_name_format().find_all(directory)]
  return max(steps) if steps else None


def read_record(workdir: str) -> Optional[dict]:
  path = os.path.join(workdir, RECORD)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, value) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


def is_finished(point: Point, workdir: str) -> bool:
  """Whether the point's run recorded its final step."""
  record = read_record(workdir)
  if record is None or record.get("status") != DONE:
    return False
  return (record.get("final_step") or 0) >= point.config.training.num_steps


def check_workdir_matches(point: Point, workdir: str) -> None:
  """Refuses a workdir left by a different point (the sweep file changed its order or values)."""
  path = os.path.join(workdir, "overrides.json")
  if not os.path.isfile(path):
    return
  with open(path) as f:
    stored = json.load(f)
  if json.loads(json.dumps(point.overrides)) != stored:
    raise InputFileError(
        f"{workdir} holds sweep point {point.index} with overrides {stored}, but the sweep now gives "
        f"it {point.overrides}; use a new --root or remove that workdir.")


def _slot_env(options: LocalOptions, slot: int) -> Dict[str, str]:
  env = dict(os.environ)
  if options.cpu_devices_per_point > 0:
    kept = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = (f"{kept} --xla_force_host_platform_device_count="
                        f"{options.cpu_devices_per_point}").strip()
  if options.gpu_ids:
    share = len(options.gpu_ids) // options.parallel or 1
    ids = list(options.gpu_ids)[slot * share:(slot + 1) * share] or list(options.gpu_ids)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
  if options.parallel > 1:
    n = str(len(_slot_cores(options.parallel, slot)))
    env.update(OMP_NUM_THREADS=n, TF_NUM_INTRAOP_THREADS=n, TF_NUM_INTEROP_THREADS="1")
  return env


def _slot_cores(parallel: int, slot: int) -> List[int]:
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  if not cores or parallel <= 1:
    return cores
  if parallel >= len(cores):
    return [cores[slot % len(cores)]]
  share = len(cores) // parallel
  return cores[slot * share:(slot + 1) * share]


def run_point(sweep: Sweep, point: Point, options: LocalOptions, slot: int) -> Result:
  """Trains one point in its workdir (resuming it there) and records the outcome."""
  workdir = workdir_of(options.root, point)
  os.makedirs(workdir, exist_ok=True)
  check_workdir_matches(point, workdir)
  _write_json(os.path.join(workdir, "overrides.json"), point.overrides)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config_to_json(point.config))
  argv = command(sweep, point, workdir, options.python, options.train_py)
  with open(os.path.join(workdir, "command.txt"), "w") as f:
    f.write(shlex.join(argv) + "\n")
  start = time.time()
  with open(os.path.join(workdir, "train.log"), "a") as log:
    log.write(f"\n=== sweep {sweep.path} point {point.index} at {time.ctime()}: {shlex.join(argv)}\n")
    log.flush()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_slot_env(options, slot))
    cores = _slot_cores(options.parallel, slot)
    if options.parallel > 1 and cores:
      try:
        os.sched_setaffinity(proc.pid, cores)
      except OSError:
        pass  # the process may have ended already
    returncode = proc.wait()
  wall = time.time() - start
  previous = read_record(workdir) or {}
  final_step = latest_step(workdir)
  if returncode != 0:
    status = FAILED
  else:
    status = DONE if (final_step or 0) >= point.config.training.num_steps else INCOMPLETE
  # Wall time adds up over attempts, so a resumed point reports its whole training time.
  total = wall + (previous.get("wall_time_s", 0.0) if previous.get("status") != DONE else 0.0)
  _write_json(os.path.join(workdir, RECORD), {
      "index": point.index, "name": point.name, "overrides": point.overrides, "status": status,
      "returncode": returncode, "final_step": final_step, "wall_time_s": total,
      "command": argv, "finished_at": time.ctime()})
  return Result(point, workdir, status, total, final_step, returncode)


def _log_tail(workdir: str, lines: int = 15) -> str:
  try:
    with open(os.path.join(workdir, "train.log"), errors="replace") as f:
      return "".join(f.readlines()[-lines:])
  except OSError:
    return ""


def run_sweep(sweep: Sweep, options: LocalOptions,
              echo: Callable[[str], None] = lambda s: print(s, flush=True)) -> List[Result]:
  """Runs the sweep's unfinished points, `options.parallel` at a time; returns one Result per point
  in point order (finished ones with skipped=True and their recorded wall time)."""
  if not os.path.isfile(options.train_py):
    raise MissingInputError(f"No train.py at {options.train_py}; pass --train_py.")
  os.makedirs(options.root, exist_ok=True)
  results: Dict[int, Result] = {}
  todo = []
  for point in sweep.points:
    workdir = workdir_of(options.root, point)
    check_workdir_matches(point, workdir)
    if is_finished(point, workdir):
      record = read_record(workdir)
      results[point.index] = Result(point, workdir, DONE, record.get("wall_time_s", 0.0),
                                    record.get("final_step"), 0, skipped=True)
    else:
      todo.append(point)
  echo(f"sweep {sweep.name}: {len(sweep.points)} points, {len(results)} already finished, "
       f"{len(todo)} to run, {options.parallel} at a time, under {options.root}")
  slots: "queue.Queue[int]" = queue.Queue()
  for slot in range(max(1, options.parallel)):
    slots.put(slot)
  lock, start, walls = threading.Lock(), time.time(), []

  def one(point: Point) -> Result:
    slot = slots.get()
    try:
      return run_point(sweep, point, options, slot)
    finally:
      slots.put(slot)

  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, options.parallel)) as pool:
    futures = [pool.submit(one, p) for p in todo]
    for future in concurrent.futures.as_completed(futures):
      result = future.result()
      with lock:
        results[result.point.index] = result
        walls.append(result.wall_time_s)
        remaining = len(todo) - len(walls)
        eta = sum(walls) / len(walls) * remaining / max(1, options.parallel)
        echo(f"[{len(walls)}/{len(todo)}] point {result.point.dirname}: {result.status} "
             f"(step {result.final_step}, {result.wall_time_s:.0f} s); elapsed "
             f"{time.time() - start:.0f} s, ETA {eta:.0f} s")
        if result.status == FAILED:
          echo(f"  exit status {result.returncode}; end of {result.workdir}/train.log:\n"
               + _log_tail(result.workdir))
  return [results[p.index] for p in sweep.points]
