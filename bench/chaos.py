"""Chaos test of train.py: SIGKILLs at random moments (also mid async checkpoint write) lose nothing.

  python bench/chaos.py --kills 10 --sigterm --steps 16 --seed 1        # tiny model, ~7 min on 2 cores
  python bench/chaos.py --kills 20 --steps 16 --model minimal --seed 2  # ~3 min

Runs the stage-2 :tiny config once uninterrupted (the reference), then again in another workdir
where each of `--kills` runs is killed with SIGKILL -- right after a random start-up phase, shortly
after one of its first steps, or right after one of its first async checkpoint writes began -- and
restarted. Checked after every kill: the restart resumes from the newest committed step (never a
partly written one) and never fails to load. At the end the whole train state (params, optimizer
state, EMA, RNG, counters), the data position and the latent scale factor must equal the
reference's bit for bit. `--sigterm` first sends one SIGTERM (preemption), which must save the
last completed step and exit 0.

Prints a JSON report; exits 1 on any loss. tests/test_reliability.py runs it with 2 kills, and
tests/test_multihost.py uses its train.py runners."""

import argparse
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Model variants over configs/shapes_ldm.py:tiny. "tiny" is the config as it is (UNet with
# cross-attention, LDM text transformer); "minimal" keeps the trainer identical but shrinks the
# networks to a conv-only UNet without text, so a train.py process starts in ~10 s on a CPU (CI).
MODELS = {
    "tiny": (),
    "minimal": (
        "--config.model.text_encoder.kind=none", "--config.model.text_encoder.trainable=False",
        "--config.model.unet.block_out_channels=(16,)", "--config.model.unet.attention_levels=(False,)",
        "--config.model.unet.mid_block_attention=False", "--config.model.unet.norm_num_groups=8",
        "--config.model.vae.block_out_channels=(8,8,8)", "--config.model.vae.norm_num_groups=8",
        "--config.model.vae.mid_block_attention=False"),
}
_SAVING = re.compile(r"Saving checkpoint step (\d+) to")
_RESUMING = re.compile(r"Resuming from \S+ step (\d+)")
_STEP_DONE = re.compile(r"\] \[(\d+)\] grad_norm=")
# Log lines of start-up phases in order: VAE init, data + latents cache, restore, latent scale,
# step compiled. A start-up kill lands just after one of them.
_STARTUP_MARKS = ("Mesh {", "Frozen: VAE", "Restore source", "Latent scale factor",
                  "Train step memory")


def train_args(data_dir: str, steps: int, checkpoint_every: int, extra: Sequence[str] = (),
               model: str = "minimal") -> List[str]:
  """train.py flags of the reliability runs: :tiny, random VAE, constant LR, `MODELS[model]`.

  A constant schedule makes the trajectory independent of num_steps, so a run stopped at step k
  and resumed with more steps follows the uninterrupted run exactly.
  """
  return ["--config", "configs/shapes_ldm.py:tiny", "--config.frozen.vae=",
          f"--config.data.data_dir={data_dir}", f"--config.training.num_steps={steps}",
          f"--config.training.checkpoint_every={checkpoint_every}", "--config.training.log_every=1",
          "--config.training.sample_every=0", "--config.optimizer.schedule=constant",
          *MODELS[model], *extra]


def subprocess_env(devices: int, index_log: Optional[str] = None) -> Dict[str, str]:
  """The environment of a train.py process with `devices` fake CPU devices.

  Keeps the caller's settings (tests: compile cache, XLA opt level, RNG scheme) and only sets the
  device count, so reference and chaos runs compile the same programs.
  """
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.setdefault("JAX_THREEFRY_PARTITIONABLE", "false")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if env.get("JAX_COMPILATION_CACHE_DIR"):
    # Restarts then load even the sub-second programs (VAE init, encoders) from the cache.
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env.pop("LDJ_DATA_INDEX_LOG", None)
  if index_log:
    env["LDJ_DATA_INDEX_LOG"] = index_log
  return env


def start(workdir: str, args: Sequence[str], env: Dict[str, str], log_path: str) -> subprocess.Popen:
  """Starts train.py with stdout+stderr going to `log_path`."""
  log = open(log_path, "w")
  proc = subprocess.Popen([sys.executable, "train.py", "--workdir", workdir, *args], cwd=ROOT,
                          env=env, stdout=log, stderr=subprocess.STDOUT)
  log.close()
  return proc


def read_log(path: str) -> str:
  with open(path, errors="replace") as f:
    return f.read()


def wait_for(proc: subprocess.Popen, log_path: str, pattern: re.Pattern, *, count: int = 1,
             timeout: float = 600.0) -> Optional[re.Match]:
  """Polls the log until `pattern` matched `count` times; None if the process ended first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    matches = list(pattern.finditer(read_log(log_path)))
    if len(matches) >= count:
      return matches[count - 1]
    if proc.poll() is not None:
      return None
    time.sleep(0.02)
  raise TimeoutError(f"{pattern.pattern!r} not seen in {log_path} within {timeout}s")


def run(workdir: str, args: Sequence[str], env: Dict[str, str], log_path: str,
        timeout: float = 900.0) -> None:
  """Runs train.py to completion; raises with the log's tail when it fails."""
  proc = start(workdir, args, env, log_path)
  if proc.wait(timeout=timeout) != 0:
    raise RuntimeError(f"train.py failed ({proc.returncode}):\n{read_log(log_path)[-6000:]}")


def committed_steps(workdir: str) -> List[int]:
  """Committed steps as Orbax sees them: integer-named directories (temporaries have a suffix)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def writes_in_flight(workdir: str) -> int:
  return len(glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*")))


def read_checkpoint(workdir: str, step: Optional[int] = None) -> dict:
  """A committed step as host numpy: {"step", "state": {path: array}, "data", "meta"}."""
  import jax
  import orbax.checkpoint as ocp
  step = committed_steps(workdir)[-1] if step is None else step
  step_dir = os.path.join(workdir, "checkpoints", str(step))
  ckpt = ocp.PyTreeCheckpointer()
  tree = ckpt.metadata(os.path.join(step_dir, "state")).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = ckpt.restore(os.path.join(step_dir, "state"), restore_args=args)
  flat = {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(state)}
  out = {"step": step, "state": flat}
  for item in ("data", "meta"):
    with open(os.path.join(step_dir, item, "metadata")) as f:
      out[item] = json.load(f)
  return out


def bitwise_differences(a: dict, b: dict) -> List[str]:
  """Names of the state leaves (and items) that differ in dtype, shape or any bit."""
  diffs = [k for k in sorted(set(a["state"]) | set(b["state"]))
           if k not in a["state"] or k not in b["state"]
           or a["state"][k].dtype != b["state"][k].dtype
           or a["state"][k].tobytes() != b["state"][k].tobytes()]
  if a["data"] != b["data"]:
    diffs.append(f"data {a['data']} != {b['data']}")
  if a["meta"]["latent_scale_factor"] != b["meta"]["latent_scale_factor"]:
    diffs.append("meta.latent_scale_factor")
  return diffs


def prepare_data(data_dir: str) -> str:
  """Generates the datasets of both stages' :tiny configs into `data_dir` once (stage 1 reads the
  layout images, stage 2 the captioned ones), so concurrent runs and processes only read them."""
  from latent_diffusion_jax.core.config import load_config_file
  from latent_diffusion_jax.data.batches import load_shapes_split
  for name in ("shapes_autoencoder.py:tiny", "shapes_ldm.py:tiny"):
    c = load_config_file(os.path.join(ROOT, "configs", name))
    c.data.data_dir = data_dir
    load_shapes_split(c, data_dir, None, "train")
  return data_dir


def reference_run(base: str, steps: int, *, devices: int = 8, model: str = "minimal") -> str:
  """An uninterrupted run of `steps` in `<base>/reference`, made once and reused (tests share it).

  Its data index log is in `<base>/reference_indices`; the dataset in `<base>/tfds`.
  """
  workdir = os.path.join(base, "reference")
  if steps not in committed_steps(workdir):
    env = subprocess_env(devices, index_log=os.path.join(base, "reference_indices"))
    os.makedirs(env["LDJ_DATA_INDEX_LOG"], exist_ok=True)
    run(workdir, train_args(os.path.join(base, "tfds"), steps, 2, model=model), env,
        os.path.join(base, "reference.log"))
  return workdir


def _kill_plan(rng: random.Random, kills: int, sigterm: bool) -> List[str]:
  """Kinds of interruption, in order: a SIGTERM first if asked, then SIGKILLs that alternate
  between right-after-a-save-began and a random moment of start-up or training."""
  plan = ["sigterm"] if sigterm else []
  for i in range(kills):
    plan.append("save" if i % 2 == 0 else rng.choice(["startup", "training"]))
  return plan


def _interrupt(kind: str, proc: subprocess.Popen, log_path: str, workdir: str, rng: random.Random,
               nth: int) -> dict:
  """Waits for the moment `kind` asks for (the `nth` step or save of this run), then signals.

  Returns what was observed.
  """
  kind, _, mark = kind.partition(":")
  event = {"kind": kind}
  if kind == "startup":
    mark = mark or rng.choice(_STARTUP_MARKS)
    event["after"] = mark
    if wait_for(proc, log_path, re.compile(re.escape(mark))) is None:
      return dict(event, missed=True)
    time.sleep(rng.uniform(0.0, 0.5))
  elif kind == "training":
    if wait_for(proc, log_path, _STEP_DONE, count=nth) is None:
      return dict(event, missed=True)
    time.sleep(rng.uniform(0.0, 0.3))
  elif kind == "save":
    if wait_for(proc, log_path, _SAVING, count=nth) is None:
      return dict(event, missed=True)
    time.sleep(rng.uniform(0.0, 0.3))
  elif kind == "sigterm":
    if wait_for(proc, log_path, _STEP_DONE) is None:
      return dict(event, missed=True)
  if proc.poll() is not None:
    return dict(event, missed=True)
  event["in_flight"] = writes_in_flight(workdir)
  proc.send_signal(signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)
  proc.wait(timeout=600)
  event.update(returncode=proc.returncode, committed_after=committed_steps(workdir))
  return event


def chaos(workdir: str, args: Sequence[str], env: Dict[str, str], *, kills: int, seed: int,
          sigterm: bool = False, plan: Optional[List[str]] = None, max_nth: int = 3) -> List[dict]:
  """Interrupts train.py `kills` times (plus one SIGTERM first if asked), then lets it finish.

  `plan` fixes the kinds in order instead: "sigterm", "save", "training", "startup" or
  "startup:<log text>" (right after that line, e.g. one of `_STARTUP_MARKS`). A kill
  waits for a random 1st..`max_nth` step or save of its run, so that runs make progress and kills
  also land while Orbax deletes old steps (max_to_keep); short runs (CI) want max_nth=1.

  Returns one event per process run. Raises AssertionError when a restart fails or does not
  resume from the newest committed step, or when a SIGTERM loses a step.
  """
  rng = random.Random(seed)
  events = []
  expected_resume = None
  for i, kind in enumerate((plan or _kill_plan(rng, kills, sigterm)) + ["finish"]):
    log_path = f"{workdir}.run{i}.log"
    proc = start(workdir, args, env, log_path)
    nth = rng.randint(1, max_nth)
    event = {"kind": kind} if kind == "finish" else _interrupt(kind, proc, log_path, workdir, rng,
                                                               nth)
    if "returncode" not in event:  # finished, or ended before the chosen moment came
      proc.wait(timeout=900)
      event["returncode"] = proc.returncode
    text = read_log(log_path)
    resumed = _RESUMING.search(text)
    event.update(resumed_from=int(resumed.group(1)) if resumed else None, log=log_path)
    events.append(event)
    kind = event["kind"]
    expected_rc = -signal.SIGKILL if kind in ("save", "training", "startup") else 0
    if event.get("missed"):
      expected_rc = 0
    assert event["returncode"] == expected_rc, f"run {i} ({event}) failed:\n{text[-6000:]}"
    # A restart resumes from the newest step committed when the previous run died: a partly
    # written step is never chosen, a committed one never skipped.
    if resumed or kind == "finish":
      assert event["resumed_from"] == expected_resume, (event, expected_resume)
    if kind == "sigterm" and not event.get("missed"):
      done = [int(m.group(1)) for m in _STEP_DONE.finditer(text)]
      event["last_step_done"] = max(done, default=None)
      assert "(preempted)" in text, text[-3000:]
      assert committed_steps(workdir)[-1] == event["last_step_done"], event
    steps = committed_steps(workdir)
    expected_resume = steps[-1] if steps else None
  return events


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--kills", type=int, default=10, help="SIGKILLs (default 10)")
  p.add_argument("--sigterm", action="store_true", help="send one SIGTERM before the kills")
  p.add_argument("--steps", type=int, default=16)
  p.add_argument("--checkpoint_every", type=int, default=1)
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--model", choices=sorted(MODELS), default="tiny")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="/tmp/ldj_chaos")
  p.add_argument("--reference", default="", help="an existing uninterrupted workdir to compare with")
  a = p.parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(a.out, "jax_cache"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
  env = subprocess_env(a.devices)
  args = train_args(os.path.join(a.out, "tfds"), a.steps, a.checkpoint_every, model=a.model)
  reference = a.reference or os.path.join(a.out, "reference")
  t0 = time.time()
  if not a.reference and a.steps not in committed_steps(reference):
    run(reference, args, env, os.path.join(a.out, "reference.log"))
  workdir = os.path.join(a.out, f"chaos_seed{a.seed}")
  shutil.rmtree(workdir, ignore_errors=True)
  events = chaos(workdir, args, env, kills=a.kills, seed=a.seed, sigterm=a.sigterm)
  diffs = bitwise_differences(read_checkpoint(workdir), read_checkpoint(reference, a.steps))
  kills = [e for e in events if e["kind"] not in ("finish", "sigterm") and not e.get("missed")]
  # A temporary step directory seen during training is this run's save in flight; one seen during
  # start-up may be a dead run's leftover that the Checkpointer has not removed yet.
  writing = [e for e in kills if e["kind"] in ("save", "training") and e["in_flight"]]
  report = {"kills": len(kills), "during_async_write": len(writing),
            "missed": sum(bool(e.get("missed")) for e in events), "restarts": len(events) - 1,
            "bit_exact": not diffs, "differences": diffs[:10], "events": events,
            "seconds": round(time.time() - t0, 1)}
  print(json.dumps(report, indent=1))
  return 0 if not diffs else 1


if __name__ == "__main__":
  sys.exit(main())
