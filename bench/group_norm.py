"""GroupNorm alone: ours (models/group_norm.py) against flax.linen.GroupNorm and torch's, forward and
forward+backward, at the UNet's activation shapes (NHWC for the JAX sides, NCHW for torch).

  python bench/group_norm.py --shapes 4x32x32x64,4x16x16x128,4x8x8x256,16x32x32x64 --groups 32
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import side_by_side as sbs  # noqa: E402  (also puts the repo on sys.path)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from latent_diffusion_jax.models.group_norm import GroupNorm  # noqa: E402


def _jax_times(module, x, repeats):
  params = module.init(jax.random.key(0), x)
  fwd = jax.jit(module.apply)
  grad = jax.jit(jax.grad(lambda p, x: (module.apply(p, x) ** 2).sum(), argnums=(0, 1)))
  return (sbs.median_ms(lambda: fwd(params, x).block_until_ready(), repeats),
          sbs.median_ms(lambda: jax.block_until_ready(grad(params, x)), repeats))


def _torch_times(x, groups, repeats):
  import torch
  norm = torch.nn.GroupNorm(groups, x.shape[-1], eps=1e-6)
  tx = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous()
  with torch.no_grad():
    fwd = sbs.median_ms(lambda: norm(tx), repeats)
  tx.requires_grad_()
  return fwd, sbs.median_ms(lambda: (norm(tx) ** 2).sum().backward(), repeats)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shapes", default="4x32x32x64,4x16x16x128,4x8x8x256,16x32x32x64")
  p.add_argument("--groups", type=int, default=32)
  p.add_argument("--repeats", type=int, default=15)
  p.add_argument("--no_torch", action="store_true")
  a = p.parse_args(argv)
  print(f"GroupNorm ({a.groups} groups), float32, median of {a.repeats} (ms): forward / forward+backward")
  print("| shape (NHWC) | ours | flax.linen.GroupNorm | torch |")
  print("|---|---|---|---|")
  rng = np.random.default_rng(0)
  for text in a.shapes.split(","):
    shape = tuple(int(s) for s in text.split("x"))
    x = jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 2 + 1)
    cells = []
    for module in (GroupNorm(num_groups=a.groups), nn.GroupNorm(num_groups=a.groups, epsilon=1e-6)):
      cells.append("%.3f / %.3f" % _jax_times(module, x, a.repeats))
    cells.append("-" if a.no_torch else "%.3f / %.3f" % _torch_times(x, a.groups, a.repeats))
    print(f"| {text} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()
