"""How the diffusion train step's cost grows: img/s against the global batch and against the
number of devices (data, and data x fsdp meshes), and XLA's per-device memory of a large step
compiled ahead of time (nothing allocated), with and without remat.

The step is the trainer's own (training/diffusion_step.make_train_step: latents from stored VAE
moments, noise, the UNet, AdamW, EMA; compiled by training/startup.compile_step with the state's
fsdp shardings), on random weights and a random batch. Without accelerators it runs on fake CPU
devices (`--devices`, default 8, set before jax starts): they share the host's cores, so the
device sweep shows what sharding costs in collectives and per-device overhead, not a speed-up.

  python bench/scaling.py throughput --config tiny --batches 8,16,32,64 --meshes 1,2,4,8,2x2,2x4,1x8
  python bench/scaling.py memory --config sd15 --batches 32,64 --mesh 1x8 --dtype bfloat16

Meshes are "D" (D devices on "data") or "DxF" ("data" x "fsdp"). The memory table adds argument,
output and temporary bytes per device as XLA's buffer assignment for this backend reports them
(the donated state counted once), and says whether that fits in --device_gib.
"""

import argparse
import os
import sys
import time


def _force_devices(n: int) -> None:
  """Fake CPU devices for the mesh sweeps; must run before jax is imported."""
  if "jax" in sys.modules:
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def _devices_flag(argv) -> int:
  for i, a in enumerate(argv):
    if a.startswith("--devices="):
      return int(a.split("=", 1)[1])
    if a == "--devices" and i + 1 < len(argv):
      return int(argv[i + 1])
  return 8


if __name__ == "__main__":
  _force_devices(_devices_flag(sys.argv[1:]))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import side_by_side as sbs  # noqa: E402  (also puts the repo on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from latent_diffusion_jax.core import parallel  # noqa: E402
from latent_diffusion_jax.diffusion.spec import DiffusionSpec  # noqa: E402
from latent_diffusion_jax.models import build  # noqa: E402
from latent_diffusion_jax.training import startup  # noqa: E402
from latent_diffusion_jax.training.diffusion_step import (DiffusionTask, init_train_state,  # noqa: E402
                                                          make_train_step)
from latent_diffusion_jax.training.state import learning_rate_schedule, make_optimizer  # noqa: E402

CONTEXT_LENGTH = 77
GIB = 2**30
# XLA options for the memory part: LLVM at -O0 (the buffers are assigned before code generation).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def parse_mesh(text: str):
  """"D" -> (D, 1, 1); "DxF" -> (D, F, 1)."""
  data, _, fsdp = text.partition("x")
  return (int(data), int(fsdp or 1), 1)


class Step:
  """The trainer's diffusion step of `config`'s UNet on a mesh: abstract or real state, batches."""

  def __init__(self, config, mesh_shape):
    self.config = config
    devices = jax.devices()[:int(np.prod(mesh_shape))]
    self.mesh = parallel.create_mesh(mesh_shape, devices=devices)
    self.rules = tuple(tuple(r) for r in config.mesh.logical_axis_rules)
    self.unet = build.build_unet(config.model)
    o = config.optimizer
    self.tx, self.lr = make_optimizer(o, 10_000), learning_rate_schedule(o, 10_000)
    self.task = DiffusionTask(unet=self.unet, vae=None, conditioner=None,
                              schedule=DiffusionSpec.from_config(config.diffusion).noise_schedule(),
                              prediction_type=config.diffusion.prediction_type)
    self.size = build.latent_size(config.model)
    self.step = make_train_step(self.task, self.tx, self.lr, ema_decay=o.ema_decay)

  def init_fn(self, key):
    u = self.unet
    probe = (jnp.zeros((1, self.size, self.size, u.in_channels)), jnp.zeros((1,), jnp.int32),
             jnp.zeros((1, 1, u.cross_attention_dim)))
    params = {"unet": self.unet.init(key, *probe)["params"]}
    o = self.config.optimizer
    return init_train_state(params, self.tx, self.config.seed, ema=o.ema_decay > 0)

  def batch_shapes(self, batch: int):
    ch = self.unet.in_channels
    return {"moments": ((batch, self.size, self.size, 2 * ch), np.float32),
            "context": ((batch, CONTEXT_LENGTH, self.unet.cross_attention_dim), np.float32)}

  def extra(self):
    return ({"vae": None}, startup.device_scalar(0.18215, self.mesh))

  def jitted(self, shardings, batch_shardings, extra):
    extra_shardings = jax.tree.map(lambda x: x.sharding, extra)
    return jax.jit(self.step, in_shardings=(shardings, batch_shardings) + tuple(extra_shardings),
                   out_shardings=(shardings, startup.replicated(self.mesh)), donate_argnums=(0,))


def memory(config, mesh_shape, batch: int, fast_compile: bool = True) -> dict:
  """XLA's per-device bytes of the step compiled for abstract inputs (nothing is allocated)."""
  s = Step(config, mesh_shape)
  with parallel.mesh_context(s.mesh, s.rules):
    abstract, shardings = parallel.sharded_abstract_state(s.init_fn, jax.random.key(0),
                                                          mesh=s.mesh, rules=s.rules)
    batch_abstract = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(
        s.mesh, len(shape))) for k, (shape, dtype) in s.batch_shapes(batch).items()}
    batch_shardings = jax.tree.map(lambda x: x.sharding, batch_abstract)
    extra = s.extra()
    t = time.perf_counter()
    lowered = s.jitted(shardings, batch_shardings, extra).lower(abstract, batch_abstract, *extra)
    # Buffer assignment is done on the HLO; the machine code's optimization level does not change
    # it, and at -O0 a large step compiles several times faster on a CPU.
    compiled = lowered.compile(compiler_options=dict(FAST_COMPILE) if fast_compile else None)
    compile_seconds = time.perf_counter() - t
  m = compiled.memory_analysis()
  args, out, temp = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
  alias = getattr(m, "alias_size_in_bytes", 0) or 0
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  return {"batch": batch, "mesh": list(mesh_shape), "remat": bool(config.model.unet.remat),
          "dtype": config.model.dtype, "attention": config.model.attention_impl,
          "unet_params": params, "argument_bytes": args, "output_bytes": out, "temp_bytes": temp,
          "alias_bytes": alias, "total_bytes": args + out - alias + temp,
          "compile_seconds": compile_seconds}


def throughput(config, mesh_shape, batch: int, steps: int) -> dict:
  """img/s of the step on real (random) state and batch, median of `steps` timed calls."""
  s = Step(config, mesh_shape)
  rng = np.random.default_rng(0)
  host = {k: (rng.standard_normal(shape) * (5 if k == "moments" else 1)).astype(dtype)
          for k, (shape, dtype) in s.batch_shapes(batch).items()}
  ch = s.unet.in_channels
  host["moments"][..., ch:] = -6.0  # log-variance
  with parallel.mesh_context(s.mesh, s.rules):
    state, shardings = parallel.create_sharded_state(s.init_fn, jax.random.key(0), mesh=s.mesh,
                                                     rules=s.rules)
    batch_arrays = parallel.global_batch(host, s.mesh)
    extra = s.extra()
    t = time.perf_counter()
    step = startup.compile_step(s.step, state, shardings, batch_arrays, extra, s.mesh)
    compile_seconds = time.perf_counter() - t
  holder = {"state": state}

  def one():
    holder["state"], metrics = step(holder["state"], batch_arrays, *extra)
    return metrics["loss"]

  times = sbs.timed(one, lambda loss: float(jax.device_get(loss)), steps)
  return {"batch": batch, "mesh": list(mesh_shape), "devices": s.mesh.size,
          "seconds_per_step": times["median"], "best_seconds_per_step": times["best"],
          "images_per_second": batch / times["median"], "compile_seconds": compile_seconds}


def _load() -> str:
  try:
    return "load average %.1f %.1f %.1f" % os.getloadavg()
  except OSError:
    return "load average unknown"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("part", choices=("throughput", "memory"))
  p.add_argument("--config", default=None,
                 help=f"one of {', '.join(sbs.CONFIG_NAMES)} or path/to/config.py[:arg] "
                      "(default: tiny for throughput, sd15 for memory)")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                 help="compute dtype (default: float32 for throughput, bfloat16 for memory)")
  p.add_argument("--attention", default=None, help="attention implementation (default: the config's)")
  p.add_argument("--batches", default=None, help="global batch sizes (default 8,16,32,64 / 32,64)")
  p.add_argument("--meshes", default="1,2,4,8,2x2,2x4,1x8",
                 help="throughput: meshes of the device sweep (D or DxF)")
  p.add_argument("--device_batch", default="8x1",
                 help="throughput: the mesh of the batch sweep")
  p.add_argument("--sweep_batch", type=int, default=16, help="throughput: global batch of the device sweep")
  p.add_argument("--mesh", default="1x8", help="memory: the mesh (DxF)")
  p.add_argument("--remat", default="off,on", help="memory: remat settings to compile")
  p.add_argument("--steps", type=int, default=3, help="throughput: timed steps per point (median)")
  p.add_argument("--device_gib", type=float, default=80.0, help="memory: what a device holds")
  p.add_argument("--devices", type=int, default=8,
                 help="fake CPU devices (read before jax starts; ignored on accelerators)")
  p.add_argument("--json", default="", help="also write the results to this JSON file")
  args = p.parse_args(argv)
  name = args.config or ("tiny" if args.part == "throughput" else "sd15")
  config = sbs.load_named_config(name)
  config.model.dtype = args.dtype or ("float32" if args.part == "throughput" else "bfloat16")
  if args.attention:
    config.model.attention_impl = args.attention
  results = {"benchmark": f"scaling_{args.part}", "config": name, "dtype": config.model.dtype,
             "attention": config.model.attention_impl, **sbs.environment(),
             "load_before": _load(), "rows": []}
  if args.part == "memory":
    batches = [int(b) for b in (args.batches or "32,64").split(",")]
    for remat in args.remat.split(","):
      config.model.unet.remat = remat == "on"
      for b in batches:
        r = memory(config, parse_mesh(args.mesh), b)
        results["rows"].append(r)
        print(f"batch {b}, remat {remat}: {r['total_bytes'] / GIB:.2f} GiB per device (args "
              f"{r['argument_bytes'] / GIB:.2f}, outputs {r['output_bytes'] / GIB:.2f}, aliased "
              f"{r['alias_bytes'] / GIB:.2f}, temps {r['temp_bytes'] / GIB:.2f}); compiled in "
              f"{r['compile_seconds']:.0f} s ({_load()})", flush=True)
  else:
    batches = [int(b) for b in (args.batches or "8,16,32,64").split(",")]
    rows = [("batch", parse_mesh(args.device_batch), b) for b in batches]
    rows += [("devices", parse_mesh(m), args.sweep_batch) for m in args.meshes.split(",")]
    for sweep, mesh_shape, b in rows:
      r = throughput(config, mesh_shape, b, args.steps)
      r["sweep"] = sweep
      results["rows"].append(r)
      print(f"{sweep} sweep: mesh {mesh_shape}, batch {b}: {r['images_per_second']:.2f} img/s "
            f"({_load()})", flush=True)
  results["load_after"] = _load()
  _print(results, args.device_gib)
  sbs.write_json(args.json, results)
  return results


def _mesh_name(m) -> str:
  return f"data {m[0]} x fsdp {m[1]}" if m[1] > 1 else f"data {m[0]}"


def _print(r, device_gib: float):
  print(f"scaling ({r['benchmark']}), config {r['config']}, {r['dtype']}, attention {r['attention']}")
  print(f"{r['date']}; {r['machine']}; jax {r['jax']} on {r['jax_devices']}; "
        f"{r['load_before']} before, {r['load_after']} after")
  if r["benchmark"] == "scaling_memory":
    print(f"| global batch | mesh | remat | args GiB | outputs GiB | temps GiB | total GiB/device "
          f"| fits {device_gib:.0f} GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for x in r["rows"]:
      fits = "yes" if x["total_bytes"] <= device_gib * GIB else "no"
      print(f"| {x['batch']} | {_mesh_name(x['mesh'])} | {'on' if x['remat'] else 'off'} | "
            f"{x['argument_bytes'] / GIB:.2f} | {x['output_bytes'] / GIB:.2f} | "
            f"{x['temp_bytes'] / GIB:.2f} | {x['total_bytes'] / GIB:.2f} | {fits} |")
    return
  print("| sweep | mesh | devices | global batch | img/s | s/step (median) | s/step (best) |")
  print("|---|---|---|---|---|---|---|")
  for x in r["rows"]:
    print(f"| {x['sweep']} | {_mesh_name(x['mesh'])} | {x['devices']} | {x['batch']} | "
          f"{x['images_per_second']:.2f} | {x['seconds_per_step']:.3f} | "
          f"{x['best_seconds_per_step']:.3f} |")


if __name__ == "__main__":
  main()
