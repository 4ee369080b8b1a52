"""Where a UNet train step's time goes on this machine, by ablation: the UNet's loss gradient
(forward + backward, jitted) timed as it is, with each attention implementation, and with one
kind of layer made free (attention returning its values, GroupNorm returning its input). The
differences are the cost of the piece; PyTorch eager's forward + backward of the same UNet is
timed beside it.

  python bench/unet_pieces.py --config cpu_small --batch 4 --variants xla,chunked,no_attention,no_groupnorm
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from latent_diffusion_jax.cli import huge_pages  # noqa: E402

if __name__ == "__main__":  # as train.py runs: see cli/huge_pages.py
  huge_pages.reexec_with_huge_pages()

import argparse
import time
from unittest import mock

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import side_by_side as sbs  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from latent_diffusion_jax.models import build  # noqa: E402


class _Identity(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x


def _best(fn, repeats):
  fn()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def time_variant(config, variant: str, batch: int, repeats: int) -> float:
  patches = []
  if variant in ("xla", "chunked", "jax", "auto"):
    config.model.attention_impl = variant
  elif variant == "no_attention":
    patches.append(mock.patch("latent_diffusion_jax.models.transformer.dot_product_attention",
                              lambda q, k, v, **kw: jnp.broadcast_to(v.mean(1, keepdims=True), q.shape)))
  elif variant == "no_groupnorm":
    patches.append(mock.patch("latent_diffusion_jax.models.layers.group_norm",
                              lambda *a, name=None, **kw: _Identity(name=name)))
  else:
    raise ValueError(variant)
  for p in patches:
    p.start()
  try:
    unet = build.build_unet(config.model)
    size = build.latent_size(config.model)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, unet.in_channels)), jnp.float32)
    t = jnp.arange(batch, dtype=jnp.int32) * 100
    ctx = jnp.asarray(rng.standard_normal((batch, 77, unet.cross_attention_dim)), jnp.float32)
    params = jax.jit(unet.init)(jax.random.key(0), x[:1], t[:1], ctx[:1])["params"]
    grad = jax.jit(jax.grad(lambda p: (unet.apply({"params": p}, x, t, ctx) ** 2).mean()))
    return _best(lambda: jax.block_until_ready(grad(params)), repeats)
  finally:
    for p in patches:
      p.stop()


def time_torch(config, batch: int, repeats: int) -> float:
  import torch
  from train_throughput import torch_unet
  _, model = torch_unet(config)
  size = build.latent_size(config.model)
  x = torch.randn(batch, model.config.in_channels, size, size)
  t = torch.arange(batch) * 100
  ctx = torch.randn(batch, 77, config.model.unet.cross_attention_dim)

  def step():
    model.zero_grad(set_to_none=True)
    (model(x, t, encoder_hidden_states=ctx).sample ** 2).mean().backward()

  return _best(step, repeats)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="cpu_small")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--variants", default="xla,chunked,no_attention,no_groupnorm")
  a = p.parse_args()
  env = sbs.environment()
  print(f"UNet loss gradient, config {a.config}, batch {a.batch}, best of {a.repeats}; "
        f"{env['date']}; {env['machine']}; jax {env['jax']}; torch {env['torch']}")
  print("| variant | seconds |")
  print("|---|---|")
  print(f"| diffusers eager | {time_torch(sbs.load_named_config(a.config), a.batch, a.repeats):.3f} |",
        flush=True)
  for variant in a.variants.split(","):
    seconds = time_variant(sbs.load_named_config(a.config), variant, a.batch, a.repeats)
    print(f"| ours, {variant} | {seconds:.3f} |", flush=True)


if __name__ == "__main__":
  main()
