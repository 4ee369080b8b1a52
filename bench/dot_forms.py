"""The three products of a Dense layer's train step, ours against torch's, one shape at a time:
the forward `x @ W`, the input gradient `dy @ W^T` and the kernel gradient `x^T @ dy`, for x of
[rows, in] and W of [in, out], float32.

Ours are what XLA compiles from `layers.matmul_last_axis` and its `jax.vjp` (each jitted alone);
torch's are `torch.mm` on the same arrays, in torch's threads. Prints ms and GFLOP/s of each, and
ours / torch's time. The defaults are the cpu_small UNet's commonest Dense shapes in a batch-4
train step (rows = batch x tokens).

  python bench/dot_forms.py --shapes 4096x64x64,1024x128x1024,256x1024x256 --repeats 30
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import side_by_side as sbs  # noqa: E402  (also puts the repo on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from latent_diffusion_jax.models.layers import matmul_last_axis  # noqa: E402

DEFAULT_SHAPES = ("4096x64x64,4096x64x512,4096x256x64,1024x128x128,1024x128x1024,1024x512x128,"
                  "256x1024x256,308x768x256")
FORMS = ("forward", "input gradient", "kernel gradient")


def parse_shapes(text: str):
  shapes = []
  for item in text.split(","):
    dims = tuple(int(d) for d in item.lower().split("x"))
    if len(dims) != 3 or min(dims) < 1:
      raise SystemExit(f"--shapes: {item!r} is not ROWSxINxOUT with positive sizes")
    shapes.append(dims)
  return shapes


def _ours(x, w, dy, repeats):
  forward = jax.jit(matmul_last_axis)
  input_grad = jax.jit(lambda x, w, dy: jax.vjp(lambda x: matmul_last_axis(x, w), x)[1](dy)[0])
  kernel_grad = jax.jit(lambda x, w, dy: jax.vjp(lambda w: matmul_last_axis(x, w), w)[1](dy)[0])
  return (sbs.median_ms(lambda: forward(x, w).block_until_ready(), repeats),
          sbs.median_ms(lambda: input_grad(x, w, dy).block_until_ready(), repeats),
          sbs.median_ms(lambda: kernel_grad(x, w, dy).block_until_ready(), repeats))


def _torch(x, w, dy, repeats):
  import torch
  tx, tw, tdy = (torch.from_numpy(np.array(a)) for a in (x, w, dy))
  with torch.no_grad():
    return (sbs.median_ms(lambda: torch.mm(tx, tw), repeats),
            sbs.median_ms(lambda: torch.mm(tdy, tw.t()), repeats),
            sbs.median_ms(lambda: torch.mm(tx.t(), tdy), repeats))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated ROWSxINxOUT")
  parser.add_argument("--repeats", type=int, default=30)
  args = parser.parse_args(argv)
  env = sbs.environment()
  print(f"Dense products, float32, median of {args.repeats}; {env['date']}; {env['machine']}; "
        f"jax {env['jax']}, torch {env['torch']}")
  print("| rows x in x out | " + " | ".join(f"{f}: ours / torch ms (GFLOP/s), ratio"
                                             for f in FORMS) + " |")
  print("|---|" + "---|" * len(FORMS))
  rng = np.random.default_rng(0)
  for rows, n_in, n_out in parse_shapes(args.shapes):
    x = jnp.asarray(rng.standard_normal((rows, n_in)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((n_in, n_out)) * n_in ** -0.5, jnp.float32)
    dy = jnp.asarray(rng.standard_normal((rows, n_out)), jnp.float32)
    gflop = 2.0 * rows * n_in * n_out / 1e9
    cells = []
    for ours, theirs in zip(_ours(x, w, dy, args.repeats), _torch(x, w, dy, args.repeats)):
      cells.append(f"{ours:.3f} / {theirs:.3f} ({gflop / ours * 1e3:.0f} / "
                   f"{gflop / theirs * 1e3:.0f}), {ours / theirs:.2f}")
    print(f"| {rows}x{n_in}x{n_out} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
