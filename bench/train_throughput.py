"""Diffusion train step throughput, ours against diffusers' UNet in PyTorch, side by side in one run.

Both sides train the same UNet (a diffusers `UNet2DConditionModel` built from the config with
torch's initialization, imported into ours by interop/convert.py) on the same batch and resolution
with the same work per step: a latent drawn from stored VAE moments, a random timestep, noise,
the UNet, noise-MSE loss, gradient clipping, AdamW and an EMA update. Ours is the trainer's own step
(training/diffusion_step.make_train_step, compiled by training/startup.compile_step); theirs runs
eagerly and, where it compiles, with `torch.compile` on the UNet.

Printed: img/s of each and the ratios, peak memory, our step's FLOPs per image from XLA's cost
analysis beside an analytic count (every matmul and convolution of the UNet forward, times 3),
and MFU against a matmul peak measured here.

  python bench/train_throughput.py --config cpu_small --batch 4 --steps 5           # this CPU
  python bench/train_throughput.py --config sd15 --batch 32 --dtype bfloat16 --steps 20 --mesh 1,1,1
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from latent_diffusion_jax.cli import huge_pages  # noqa: E402

if __name__ == "__main__":  # as train.py runs: see cli/huge_pages.py
  huge_pages.reexec_with_huge_pages()

import argparse

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import side_by_side as sbs  # noqa: E402  (also puts the repo on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from latent_diffusion_jax.core import flops as flops_lib, parallel  # noqa: E402
from latent_diffusion_jax.diffusion.spec import DiffusionSpec  # noqa: E402
from latent_diffusion_jax.interop.convert import torch_to_flax  # noqa: E402
from latent_diffusion_jax.interop.diffusers import abstract_unet_params  # noqa: E402
from latent_diffusion_jax.interop.diffusers_config import unet_to_diffusers_config  # noqa: E402
from latent_diffusion_jax.models import build  # noqa: E402
from latent_diffusion_jax.training import startup  # noqa: E402
from latent_diffusion_jax.training.diffusion_step import (DiffusionTask, init_train_state,  # noqa: E402
                                                          make_train_step)
from latent_diffusion_jax.training.state import learning_rate_schedule, make_optimizer  # noqa: E402

CONTEXT_LENGTH = 77


def torch_unet(config):
  """A diffusers UNet of `config` with torch's default initialization (seeded)."""
  import torch
  from diffusers import UNet2DConditionModel
  unet = build.build_unet(config.model)
  cfg = unet_to_diffusers_config(unet, build.latent_size(config.model))
  torch.manual_seed(config.seed)
  return unet, UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if k[0] != "_"})


def unet_pair(config):
  """(our UNet module, the diffusers UNet, its weights as our params): both sides' same model."""
  unet, model = torch_unet(config)
  state_dict = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  params = torch_to_flax(state_dict, abstract_unet_params(unet, build.latent_size(config.model)),
                         what="the diffusers UNet")
  return unet, model, params


def host_batch(config, batch: int):
  """VAE moments (mean, log-variance) and a text context, the same arrays for both sides."""
  rng = np.random.default_rng(0)
  size, ch = build.latent_size(config.model), config.model.unet.in_channels
  mean = rng.standard_normal((batch, size, size, ch)).astype(np.float32) * 5
  logvar = np.full_like(mean, -6.0)
  ctx = rng.standard_normal((batch, CONTEXT_LENGTH, config.model.unet.cross_attention_dim))
  return {"moments": np.concatenate([mean, logvar], -1), "context": ctx.astype(np.float32)}


def build_ours(config, unet, params, host):
  """Our compiled train step on `host`'s batch: a dict with `one_step` (runs a step, returns the
  loss), `sync`, the XLA `executable`, the `mesh`, the analytic FLOPs per step, and the pieces
  behind them (the uncompiled `step`, the `holder` of the live state, the placed `batch` and the
  `extra` arguments)."""
  mesh = parallel.create_mesh(config.mesh.shape)
  rules = config.mesh.logical_axis_rules
  o = config.optimizer
  tx, lr = make_optimizer(o, 10_000), learning_rate_schedule(o, 10_000)
  schedule = DiffusionSpec.from_config(config.diffusion).noise_schedule()
  task = DiffusionTask(unet=unet, vae=None, conditioner=None,
                       schedule=schedule, prediction_type=config.diffusion.prediction_type)
  size = build.latent_size(config.model)
  probe = (jnp.zeros((1, size, size, unet.in_channels)), jnp.zeros((1,), jnp.int32),
           jnp.zeros((1, 1, unet.cross_attention_dim)))
  init_fn = lambda key: init_train_state({"unet": unet.init(key, *probe)["params"]}, tx,
                                         config.seed, ema=o.ema_decay > 0)
  with parallel.mesh_context(mesh, rules):
    abstract, shardings = parallel.sharded_abstract_state(init_fn, jax.random.key(0), mesh=mesh,
                                                          rules=rules)
    from latent_diffusion_jax.training.foreign_init import place
    placed = place({"unet": params}, abstract.params, shardings.params, "the diffusers UNet")
    state = jax.jit(lambda p: init_train_state(p, tx, config.seed, ema=o.ema_decay > 0),
                    out_shardings=shardings)(placed)
    batch = {k: jax.device_put(v, parallel.batch_sharding(mesh, v.ndim)) for k, v in host.items()}
    extra = ({"vae": None}, startup.device_scalar(config.model.latent_scale_factor, mesh))
    step = make_train_step(task, tx, lr, ema_decay=o.ema_decay)
    compiled = startup.compile_step(step, state, shardings, batch, extra, mesh)
    executable = compiled.compile_for(state, batch, extra)  # this batch shape's, for XLA's analyses
    forward = lambda p, x, t, c: unet.apply({"params": p}, x, t, c)
    b = host["context"].shape[0]
    analytic = 3 * flops_lib.matmul_conv_flops(
        forward, params, jnp.zeros((b, size, size, unet.in_channels), unet.dtype),
        jnp.zeros((b,), jnp.int32), jnp.zeros((b, CONTEXT_LENGTH, unet.cross_attention_dim),
                                               unet.dtype))
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], batch, *extra)
    return metrics["loss"]

  return {"one_step": one_step, "sync": lambda loss: float(jax.device_get(loss)),
          "executable": executable, "mesh": mesh, "analytic": analytic,
          "step": step, "holder": holder, "batch": batch, "extra": extra}


def run_ours(config, unet, params, host, steps: int):
  built = build_ours(config, unet, params, host)
  one_step, sync, executable, mesh = (built[k] for k in ("one_step", "sync", "executable", "mesh"))
  analytic, xla = built["analytic"], flops_lib.step_flops(built["executable"])
  with sbs.PeakMemory("jax") as mem:
    times = sbs.timed(one_step, sync, steps)
  assert np.isfinite(sync(one_step())), "our step produced a non-finite loss"
  analysis = executable.memory_analysis()
  return {"seconds_per_step": times["median"], "best_seconds_per_step": times["best"],
          "peak_memory_bytes": mem.bytes, "peak_memory_source": mem.source, "devices": mesh.size,
          "xla_flops_per_step": None if xla is None else xla * mesh.size,
          "analytic_flops_per_step": analytic,
          "xla_temp_bytes_per_device": getattr(analysis, "temp_size_in_bytes", None)}


def build_torch(config, model, host, dtype: str, compile_model: bool):
  """diffusers' train step on `host`'s batch: (one_step, sync)."""
  import torch
  device = sbs.torch_device()
  model = model.to(device).train()
  o = config.optimizer
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps,
                          weight_decay=o.weight_decay)
  ema = [p.detach().clone() for p in params]
  acp = torch.tensor(np.asarray(DiffusionSpec.from_config(config.diffusion).noise_schedule()
                                .alphas_cumprod), device=device)
  moments = torch.tensor(host["moments"]).permute(0, 3, 1, 2).contiguous().to(device)
  ctx = torch.tensor(host["context"]).to(device)
  net = torch.compile(model) if compile_model else model
  scale = config.model.latent_scale_factor
  count = {"n": 0}

  def one_step():
    mean, logvar = moments.chunk(2, dim=1)
    z = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * scale
    t = torch.randint(0, acp.shape[0], (z.shape[0],), device=device)
    noise = torch.randn_like(z)
    a = acp[t].view(-1, 1, 1, 1)
    with sbs.torch_autocast(dtype, device):
      out = net(a.sqrt() * z + (1 - a).sqrt() * noise, t, encoder_hidden_states=ctx).sample
    loss = torch.nn.functional.mse_loss(out.float(), noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if o.grad_clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(params, o.grad_clip_norm)
    opt.step()
    n = count["n"] = count["n"] + 1
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1.0 - min(o.ema_decay, (1.0 + n) / (10.0 + n)))
    return loss

  def sync(loss):
    value = float(loss.detach().cpu())
    if device == "cuda":
      torch.cuda.synchronize()
    return value

  return one_step, sync


def run_torch(config, model, host, steps: int, dtype: str, compile_model: bool):
  one_step, sync = build_torch(config, model, host, dtype, compile_model)
  with sbs.PeakMemory("torch") as mem:
    times = sbs.timed(one_step, sync, steps)
  return {"seconds_per_step": times["median"], "best_seconds_per_step": times["best"],
          "peak_memory_bytes": mem.bytes, "peak_memory_source": mem.source}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sbs.add_common_flags(p)
  p.add_argument("--batch", type=int, default=4, help="global batch (images per step)")
  p.add_argument("--steps", type=int, default=5,
                 help="timed steps per side (after one untimed); the median counts")
  p.add_argument("--peak_size", type=int, default=2048, help="matmul size of the measured peak")
  args = p.parse_args(argv)
  config = sbs.configure(args)
  config.training.batch_size = args.batch
  unet, model, params = unet_pair(config)
  host = host_batch(config, args.batch)
  env = sbs.environment()
  results = {"benchmark": "train_throughput", "config": args.config, "dtype": args.dtype,
             "attention": config.model.attention_impl, "mesh": args.mesh, "batch": args.batch,
             "latent_size": build.latent_size(config.model), "steps": args.steps, **env}

  results["ours"] = run_ours(config, unet, params, host, args.steps)
  if args.compare_attention:
    other = args.compare_attention
    results["ours_attention_" + other] = run_ours(config, unet.clone(attention_impl=other), params,
                                                  host, args.steps)
  results["torch_eager"] = run_torch(config, model, host, args.steps, args.dtype, False)
  if args.torch_compile == "off":
    results["torch_compile"] = {"unavailable": "off (--torch_compile=off)"}
  else:
    try:
      results["torch_compile"] = run_torch(config, model, host, args.steps, args.dtype, True)
    except Exception as e:  # inductor needs a working compiler toolchain for the device
      results["torch_compile"] = {"unavailable": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}

  peak = flops_lib.measure_matmul_peak(args.peak_size, build.dtype_of(args.dtype))
  results["matmul_peak_flops_per_device"] = peak
  ours = results["ours"]
  ours_rows = [k for k in results if k.startswith("ours")]
  for name in ours_rows + ["torch_eager", "torch_compile"]:
    r = results[name]
    if "seconds_per_step" in r:
      r["images_per_second"] = args.batch / r["seconds_per_step"]
  for name in ("xla", "analytic"):
    f = ours[f"{name}_flops_per_step"]
    ours[f"{name}_flops_per_image"] = None if f is None else f / args.batch
  counted = ours["analytic_flops_per_step"]  # XLA counts a loop body once (see core/flops.py)
  ours["tflops_per_second_per_device"] = counted / ours["seconds_per_step"] / ours["devices"] / 1e12
  ours["mfu"] = flops_lib.mfu(counted / ours["devices"], ours["seconds_per_step"], peak)
  for name in ours_rows[1:] + ["torch_eager", "torch_compile"]:
    if "images_per_second" in results[name]:
      results[f"ours_over_{name}"] = ours["images_per_second"] / results[name]["images_per_second"]

  _print(results)
  sbs.write_json(args.json, results)
  return results


def _mib(n):
  return "-" if n is None else f"{n / 2**20:.0f} MiB"


def _print(r):
  print(f"train step, config {r['config']}, batch {r['batch']}, {r['latent_size']}x"
        f"{r['latent_size']} latents, {r['dtype']}, attention {r['attention']}, mesh {r['mesh']}, "
        f"{r['steps']} timed steps")
  print(f"{r['date']}; {r['machine']}; jax {r['jax']} on {r['jax_devices']}; torch {r['torch']} "
        f"({r['torch_device']}); diffusers {r['diffusers']}; glibc huge pages "
        f"{'on' if r.get('glibc_huge_pages') else 'off'}")
  print("| implementation | img/s | s/step (median) | s/step (best) | ours / this | peak memory |")
  print("|---|---|---|---|---|---|")
  rows = [("ours", f"ours (jax, jitted train step, attention {r['attention']})")]
  rows += [(k, f"ours, attention {k[len('ours_attention_'):]}") for k in r
           if k.startswith("ours_attention_")]
  rows += [("torch_eager", "diffusers eager"), ("torch_compile", "diffusers torch.compile")]
  for name, label in rows:
    x = r[name]
    if "unavailable" in x:
      print(f"| {label} | unavailable: {x['unavailable']} | | | | |")
      continue
    ratio = "1.00" if name == "ours" else f"{r[f'ours_over_{name}']:.2f}"
    print(f"| {label} | {x['images_per_second']:.2f} | {x['seconds_per_step']:.3f} | "
          f"{x['best_seconds_per_step']:.3f} | {ratio} | "
          f"{_mib(x['peak_memory_bytes'])} ({x['peak_memory_source']}) |")
  o = r["ours"]
  xla = o["xla_flops_per_image"]
  print(f"our FLOPs/image: XLA cost analysis {'-' if xla is None else f'{xla / 1e9:.2f} G'} "
        "(loop bodies counted once), "
        f"analytic (UNet matmuls+convs, 3x forward) {o['analytic_flops_per_image'] / 1e9:.2f} G")
  print(f"matmul peak {r['matmul_peak_flops_per_device'] / 1e12:.3f} TFLOP/s per device; ours (analytic) "
        f"{o['tflops_per_second_per_device']:.3f} TFLOP/s per device, MFU {100 * o['mfu']:.1f}%")


if __name__ == "__main__":
  main()
