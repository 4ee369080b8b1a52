"""Times "chunked" attention (models/chunked_attention.py) against "xla" and PyTorch's fused
`scaled_dot_product_attention` at one shape, forward and forward+backward, for several tile
budgets (each row names the tiles it gives; a forward that is not differentiated may take
smaller ones, named first): how LOGITS_BLOCK_BYTES was chosen.

  python bench/attention_blocks.py --batch 4 --length 1024 --heads 8 --head_dim 8 --blocks_kib 2048,4096,8192,16384
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from latent_diffusion_jax.models.attention import chunked_attention, dot_product_attention
from latent_diffusion_jax.models.chunked_attention import choose_tiles


def _time_ms(fn, repeats: int) -> float:
  fn()
  best = float("inf")
  for _ in range(repeats):  # the best of several runs: the machine may be shared
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best * 1e3


def _ms(x: float) -> str:
  """Milliseconds to one decimal, or three significant digits below 10 ms (tiny shapes)."""
  return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def _jax_times(attend, q, k, v, repeats):
  fwd = jax.jit(attend)
  grad = jax.jit(jax.grad(lambda q, k, v: (attend(q, k, v) ** 2).sum(), argnums=(0, 1, 2)))
  return (_time_ms(lambda: fwd(q, k, v).block_until_ready(), repeats),
          _time_ms(lambda: jax.block_until_ready(grad(q, k, v)), repeats))


def _tiles(plan, batch: int) -> str:
  fold, g, c = plan
  return (f"{g} (image, head) row(s)" if fold else f"{g} head(s) x {batch} images") + f" x {c} queries"


def _torch_times(q, k, v, repeats):
  import torch
  tq, tk, tv = (torch.tensor(np.asarray(t)).transpose(1, 2).contiguous() for t in (q, k, v))
  sdpa = torch.nn.functional.scaled_dot_product_attention
  with torch.no_grad():
    fwd = _time_ms(lambda: sdpa(tq, tk, tv), repeats)
  for t in (tq, tk, tv):
    t.requires_grad_()
  return fwd, _time_ms(lambda: (sdpa(tq, tk, tv) ** 2).sum().backward(), repeats)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--length", type=int, default=1024)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--head_dim", type=int, default=8)
  p.add_argument("--blocks_kib", default="2048,4096,8192,16384")
  p.add_argument("--repeats", type=int, default=5)
  a = p.parse_args()
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((a.batch, a.length, a.heads, a.head_dim)), jnp.float32)
             for _ in range(3))
  print(f"attention [B={a.batch}, L={a.length}, H={a.heads}, D={a.head_dim}] float32, "
        f"best of {a.repeats} (ms)")
  print("| implementation | forward | forward+backward |")
  print("|---|---|---|")
  rows = [("xla", lambda q, k, v: dot_product_attention(q, k, v, implementation="xla"))]
  for kib in (int(x) for x in a.blocks_kib.split(",")):
    plans = [choose_tiles(a.batch, a.heads, a.length, a.length, 4, kib * 1024, inference)
             for inference in (True, False)]
    names = [_tiles(plan, a.batch) for plan in plans]
    name = names[0] if names[0] == names[1] else f"{names[0]} (forward alone), {names[1]}"
    rows.append((f"chunked {kib} KiB: {name}",
                 lambda q, k, v, kib=kib: chunked_attention(q, k, v, block_bytes=kib * 1024)))
  for name, attend in rows:
    fwd, both = _jax_times(attend, q, k, v, a.repeats)
    print(f"| {name} | {_ms(fwd)} | {_ms(both)} |", flush=True)
  fwd, both = _torch_times(q, k, v, a.repeats)
  print(f"| torch sdpa | {_ms(fwd)} | {_ms(both)} |")


if __name__ == "__main__":
  main()
