r"""Peak host memory of loading a training checkpoint for sampling, against the size of its weights.

  .venv/bin/python bench/load_memory.py                       # UNet of ~75M params (~300 MB)
  .venv/bin/python bench/load_memory.py --unet_channels 32,64 --layers_per_block 1   # smoke run

Writes (in a temp dir, outside the measurement) a stage-2 workdir of configs/sd15.py:tiny with
its UNet widened to --unet_channels: one checkpoint of the whole AdamW TrainState (params, EMA
params, both moments; random values, so the files compress as real ones do) saved by our
Checkpointer, plus its frozen VAE and text encoder. Then, each in a fresh process, after imports
and building what the load needs but before reading any weights, it measures the peak RSS
(resource.getrusage ru_maxrss, with the peak reset through /proc/self/clear_refs where Linux
allows) minus the RSS right before the load of:
  partial  artifacts.loader.load_bundle(workdir): what sample.py and export do (an Orbax partial
           restore of ema_params/unet, plus the small frozen networks),
  full     Checkpointer.restore(step, abstract_state=<the trainer's TrainState>): every array.
and prints one table: weights (one params tree), checkpoint bytes on disk, peak extra RSS of each
load, and their ratios.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
_STEP = 1


def _config(channels, layers_per_block):
  from latent_diffusion_jax.core.config import load_config_file
  c = load_config_file(os.path.join(_ROOT, "configs", "sd15.py:tiny"))
  u = c.model.unet
  u.block_out_channels = tuple(channels)
  # SD's layout: cross-attention on every level but the last.
  u.attention_levels = (True,) * (len(channels) - 1) + (False,) if len(channels) > 1 else (True,)
  u.layers_per_block = layers_per_block
  u.num_heads = 8 if min(channels) % 8 == 0 else 4
  u.norm_num_groups = 32 if min(channels) % 32 == 0 else 8
  c.optimizer.ema_decay = 0.999
  return c


def _abstract_state(config):
  """The trainer's TrainState shapes, on one device, as a restore target."""
  import jax
  from latent_diffusion_jax.core import parallel
  from latent_diffusion_jax.models import build
  from latent_diffusion_jax.training.stages.diffusion import build_init_fn
  from latent_diffusion_jax.training.state import make_optimizer
  unet, conditioner = build.build_unet(config.model), build.build_conditioner(config.model)
  tx = make_optimizer(config.optimizer, config.training.num_steps)
  mesh = parallel.create_mesh((1, 1, 1), devices=jax.devices()[:1])
  abstract, _ = parallel.sharded_abstract_state(build_init_fn(config, unet, conditioner, tx),
                                                jax.random.key(0), mesh=mesh)
  return abstract


def _random_tree(abstract, rng):
  import jax
  import numpy as np

  def fill(x):
    if np.issubdtype(x.dtype, np.floating) and x.size > 1:
      value = (rng.standard_normal(x.shape, dtype=np.float32) * 0.02).astype(x.dtype)
    else:
      value = np.zeros(x.shape, x.dtype)
    return jax.device_put(value, x.sharding) if hasattr(x, "sharding") else value
  return jax.tree.map(fill, abstract)


def make_workdir(workdir, channels, layers_per_block):
  """Writes the workdir; returns its sizes."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from latent_diffusion_jax.artifacts.workdir import DIFFUSION_KIND
  from latent_diffusion_jax.checkpoints.checkpointer import Checkpointer
  from latent_diffusion_jax.checkpoints.trees import save_frozen
  from latent_diffusion_jax.core import config as config_lib
  from latent_diffusion_jax.core import parallel
  from latent_diffusion_jax.models import build
  config = _config(channels, layers_per_block)
  rng = np.random.default_rng(0)
  state = _random_tree(_abstract_state(config), rng)
  vae, text = build.build_vae(config.model), build.build_text_encoder(config.model)
  te = config.model.text_encoder
  frozen = {
      "vae_params": jax.eval_shape(vae.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"],
      "text_params": jax.eval_shape(text.init, jax.random.key(0),
                                    jnp.zeros((1, te.max_length), jnp.int32))["params"]}
  frozen = {k: _random_tree(parallel.unbox(v), rng) for k, v in frozen.items()}
  save_frozen(workdir, **frozen)
  meta = {"kind": DIFFUSION_KIND, "config": config_lib.config_to_json(config),
          "latent_scale_factor": 0.18215, "version": "bench"}
  with Checkpointer(workdir, async_save=False) as ckpt:
    ckpt.save(_STEP, state, data={"position": 0}, meta=meta, force=True)
  nbytes = lambda tree: int(sum(x.nbytes for x in jax.tree.leaves(tree)))
  state_dir = os.path.join(workdir, "checkpoints", str(_STEP), "state")
  on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(state_dir) for f in fs)
  return {"weights": nbytes(state.params), "state": nbytes(state), "disk": on_disk,
          "frozen": nbytes(frozen), "unet_params": int(sum(
              x.size for x in jax.tree.leaves(state.params["unet"])))}


def _rss() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no VmRSS in /proc/self/status")


def _reset_peak() -> bool:
  """Sets the peak RSS to the current RSS (Linux >= 4.0); False where that is not allowed."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def measure(workdir, mode):
  """Peak RSS growth of one load in this (fresh) process."""
  import gc
  import jax
  from latent_diffusion_jax.artifacts import loader
  from latent_diffusion_jax.artifacts.workdir import read_run
  from latent_diffusion_jax.checkpoints.checkpointer import Checkpointer
  jax.devices()
  if mode == "full":
    _, _, config, _ = read_run(workdir)
    abstract = _abstract_state(config)
  gc.collect()
  reset = _reset_peak()
  before = _rss()
  start = time.perf_counter()
  if mode == "partial":
    result = loader.load_bundle(loader.Source(workdir))
    loaded = [result.unet_params, result.vae_params, result.text_encoder_params]
  else:
    with Checkpointer(workdir, read_only=True) as ckpt:
      result = ckpt.restore(_STEP, abstract_state=abstract)[0]
    loaded = [result]
  jax.block_until_ready(jax.tree.leaves(loaded))
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return {"peak_extra": peak - before, "before": before, "seconds": seconds, "peak_reset": reset,
          "loaded": int(sum(x.nbytes for x in jax.tree.leaves(loaded)))}


def _child(args, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), *extra], env=env, cwd=_ROOT,
                        capture_output=True, text=True)
  if proc.returncode != 0:
    raise SystemExit(f"{' '.join(extra)} failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _mb(n):
  return f"{n / 2**20:,.1f} MiB"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--unet_channels", default="96,192,384,384",
                      help="UNet block_out_channels (SD 1.5: 320,640,1280,1280).")
  parser.add_argument("--layers_per_block", type=int, default=2)
  parser.add_argument("--workdir", default="", help="Where the checkpoint goes (default: a temp "
                      "dir, removed afterwards).")
  parser.add_argument("--_make", default="", help=argparse.SUPPRESS)
  parser.add_argument("--_measure", default="", choices=["", "partial", "full"],
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  sys.path.insert(0, _ROOT)
  channels = [int(c) for c in args.unet_channels.split(",")]
  if args._make:
    print(json.dumps(make_workdir(args._make, channels, args.layers_per_block)))
    return 0
  if args._measure:
    print(json.dumps(measure(args.workdir, args._measure)))
    return 0

  base = args.workdir or tempfile.mkdtemp(prefix="load_memory_")
  workdir = os.path.join(base, "workdir")
  try:
    shutil.rmtree(workdir, ignore_errors=True)
    sizes = _child(args, "--_make", workdir, "--unet_channels", args.unet_channels,
                   "--layers_per_block", str(args.layers_per_block))
    runs = {mode: _child(args, "--_measure", mode, "--workdir", workdir)
            for mode in ("partial", "full")}
  finally:
    if not args.workdir:
      shutil.rmtree(base, ignore_errors=True)
  print(f"UNet {args.unet_channels} x{args.layers_per_block}: {sizes['unet_params'] / 1e6:.1f}M "
        f"params; weights = one float32 params tree (UNet; the text encoder is frozen), the train "
        f"state holds 4 (params, EMA, 2 AdamW moments): {_mb(sizes['state'])}; frozen VAE + text "
        f"encoder {_mb(sizes['frozen'])}.")
  print()
  print("| load | weights | checkpoint on disk | read | peak extra RSS | peak / weights | seconds |")
  print("|---|---|---|---|---|---|---|")
  for mode, label in (("partial", "partial: loader.load_bundle"),
                      ("full", "full: Checkpointer.restore(TrainState)")):
    r = runs[mode]
    print(f"| {label} | {_mb(sizes['weights'])} | {_mb(sizes['disk'])} | {_mb(r['loaded'])} | "
          f"{_mb(r['peak_extra'])} | {r['peak_extra'] / sizes['weights']:.2f} | "
          f"{r['seconds']:.1f} |")
  print()
  ratio = runs["full"]["peak_extra"] / max(runs["partial"]["peak_extra"], 1)
  print(f"full / partial peak extra RSS: {ratio:.2f}; peak reset via clear_refs: "
        f"{runs['partial']['peak_reset'] and runs['full']['peak_reset']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
