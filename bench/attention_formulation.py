"""The sampling loop's UNet with the "xla" attention as written (logits scaled and the softmax
normalized on the [B, H, Lq, Lk] logits; "before") and with q scaled and the output normalized
(the chunked kernel's tile form, as one tile; "after"), timed alternately in one run so that a
shared machine's load hits both alike. The default stays "before": `make demo` trained with the
other form fell below its accuracy bar (BENCHMARKS.md).

Why it mattered (a jax.profiler trace of the cpu_small UNet at batch 16, the guided batch of 8
images): XLA:CPU fuses each attention into one kernel whose operands must exist in memory, so
`logits * scale` became a materialized [16, 8, 1024, 1024] broadcast of the scale (512 MiB, built
on every call) read by each of the five 1024-token self-attention layers, which took most of the
step.

  python bench/attention_formulation.py --config cpu_small --batch 16 --steps 2 --repeats 2
"""

import argparse
import contextlib
import os
import sys
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import side_by_side as sbs  # noqa: E402  (also puts the repo on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from latent_diffusion_jax.models import attention, build  # noqa: E402
from latent_diffusion_jax.models.chunked_attention import blocked_attention  # noqa: E402


def _one_tile(q, k, v, mask, upcast):
  """The chunked kernel's form (q scaled, the output normalized) over all logits at once."""
  return blocked_attention(q, k, v, mask, upcast, block_bytes=2**62)


def sampling_loop(config, batch: int, steps: int):
  """A jitted `params -> latents`: `steps` UNet calls in a fori_loop, as samplers.sample runs them."""
  unet = build.build_unet(config.model)
  size = build.latent_size(config.model)
  x = jnp.ones((batch, size, size, unet.in_channels), jnp.float32)
  ctx = jnp.full((batch, 77, unet.cross_attention_dim), 0.1, jnp.float32)
  params = jax.jit(unet.init)(jax.random.key(0), x[:1], jnp.zeros((1,), jnp.int32), ctx[:1])["params"]

  def run(p):
    def body(i, x):
      t = jnp.full((batch,), 900 - 100 * i, jnp.int32)
      return x - 0.01 * unet.apply({"params": p}, x, t, ctx)
    return jax.lax.fori_loop(0, steps, body, x)

  return jax.jit(run), params


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="cpu_small")
  p.add_argument("--batch", type=int, default=16, help="UNet batch (a guided batch is 2x the images)")
  p.add_argument("--steps", type=int, default=2, help="UNet calls in the loop")
  p.add_argument("--repeats", type=int, default=2, help="timed calls of each, alternating")
  args = p.parse_args(argv)
  config = sbs.load_named_config(args.config)
  config.model.attention_impl = "xla"
  fns = {}
  for name in ("before", "after"):
    patch = (mock.patch.object(attention, "_xla_attention", _one_tile)
             if name == "after" else contextlib.nullcontext())
    with patch:  # traced and compiled while the patch holds
      fn, params = sampling_loop(config, args.batch, args.steps)
      fns[name] = (fn.lower(params).compile(), params)
  outs = {name: fn(params) for name, (fn, params) in fns.items()}  # untimed first calls
  diff = float(jnp.abs(outs["before"] - outs["after"]).max())
  times = {name: [] for name in fns}
  for _ in range(args.repeats):
    for name, (fn, params) in fns.items():
      t = time.perf_counter()
      fn(params).block_until_ready()
      times[name].append(time.perf_counter() - t)
  print(f"UNet sampling loop, config {args.config}, batch {args.batch}, {args.steps} steps, "
        f"attention xla; {sbs.environment()['date']}; load average "
        + " ".join(f"{x:.1f}" for x in os.getloadavg()))
  print("| attention formulation | s per UNet call (best) | all calls |")
  print("|---|---|---|")
  for name, ts in times.items():
    print(f"| {name} | {min(ts) / args.steps:.2f} | "
          + ", ".join(f"{t / args.steps:.2f}" for t in ts) + " |")
  print(f"speed-up {min(times['before']) / min(times['after']):.2f}x; max |before - after| {diff:.2e}")


if __name__ == "__main__":
  main()
