"""The optimizer update alone, ours against PyTorch's, side by side in one run, on the parameter
shapes of the config's UNet (random values; a fixed gradient each call).

Ours is training/update.apply_update as the train step runs it (jitted, state donated): the
global-norm clip and AdamW of training/state.make_optimizer, the EMA, the non-finite guard and the
health metrics (gradient, parameter and update norms). PyTorch's: `clip_grad_norm_`,
`torch.optim.AdamW` (its default foreach implementation) and a `_foreach_lerp_` EMA. With
--updates_norm the form the step had before 2026-12-06 is timed too: the update's norm taken
from optax's updates inside the conditional, which made XLA write every update out.

  python bench/optimizer_update.py --config cpu_small --repeats 9 --updates_norm
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
import optax  # noqa: E402

from latent_diffusion_jax.models import build  # noqa: E402
from latent_diffusion_jax.training import state as state_lib  # noqa: E402
from latent_diffusion_jax.training.update import apply_update  # noqa: E402
from latent_diffusion_jax.interop.diffusers_config import unet_to_diffusers_config  # noqa: E402


def leaf_shapes(config):
  """The shapes of the diffusers UNet's parameters for `config` (built on the meta device)."""
  import torch
  from diffusers import UNet2DConditionModel
  unet = build.build_unet(config.model)
  cfg = unet_to_diffusers_config(unet, build.latent_size(config.model))
  with torch.device("meta"):
    model = UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if k[0] != "_"})
  return [tuple(p.shape) for p in model.parameters()]


def _updates_norm_form(state, grads, loss, tx, learning_rate, ema_decay):
  """The update as apply_update did it before 2026-12-06: the norm of optax's updates."""
  grad_norm = state_lib.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(_):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state_lib.ema_update(state.ema_params, params,
                               state_lib.ema_decay_at(ema_decay, state.step))
    return params, opt_state, ema, state_lib.global_norm(updates)

  def skip(_):
    return state.params, state.opt_state, state.ema_params, jnp.zeros((), jnp.float32)

  params, opt_state, ema, update_norm = jax.lax.cond(finite, update, skip, None)
  new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                      nonfinite_skips=state.nonfinite_skips + (~finite).astype(jnp.int32))
  return new, {"loss": loss, "grad_norm": grad_norm, "param_norm": state_lib.global_norm(params),
               "update_norm": update_norm, "learning_rate": learning_rate(state.step)}


def time_ours(config, shapes, repeats: int, updates_norm: bool) -> float:
  o = config.optimizer
  tx, lr = state_lib.make_optimizer(o, 10_000), state_lib.learning_rate_schedule(o, 10_000)
  rng = np.random.default_rng(0)
  params = {f"p{i}": jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.02)
            for i, s in enumerate(shapes)}
  grads = jax.tree.map(lambda p: p * 0.1, params)
  state = jax.jit(lambda p: state_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
      ema_params=jax.tree.map(jnp.copy, p), rng=jnp.zeros((2,), jnp.uint32),
      nonfinite_skips=jnp.zeros((), jnp.int32)))(params)

  form = _updates_norm_form if updates_norm else apply_update
  step = jax.jit(lambda s, g: form(s, g, jnp.float32(1.0), tx, lr, o.ema_decay), donate_argnums=0)
  holder = {"state": state}

  def run():
    holder["state"], metrics = step(holder["state"], grads)
    jax.block_until_ready(metrics)

  return sbs.median_ms(run, repeats)


def time_torch(config, shapes, repeats: int) -> float:
  import torch
  o = config.optimizer
  torch.manual_seed(0)
  params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
  for p in params:
    p.grad = p.detach() * 0.1
  opt = torch.optim.AdamW(params, lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps,
                          weight_decay=o.weight_decay)
  ema = [p.detach().clone() for p in params]

  def run():
    torch.nn.utils.clip_grad_norm_(params, o.grad_clip_norm)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1.0 - o.ema_decay)

  return sbs.median_ms(run, repeats)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="cpu_small")
  p.add_argument("--repeats", type=int, default=9)
  p.add_argument("--updates_norm", action="store_true",
                 help="also time the earlier form, the norm taken from optax's updates")
  args = p.parse_args(argv)
  config = sbs.load_named_config(args.config)
  shapes = leaf_shapes(config)
  n = sum(int(np.prod(s)) for s in shapes)
  rows = [("ours (apply_update)", time_ours(config, shapes, args.repeats, False))]
  if args.updates_norm:
    rows.append(("ours, norm of optax's updates (before 2026-12-06)",
                 time_ours(config, shapes, args.repeats, True)))
  rows.append(("torch clip + AdamW (foreach) + EMA", time_torch(config, shapes, args.repeats)))
  env = sbs.environment()
  print(f"\nOptimizer update, config {args.config}: {len(shapes)} arrays, {n / 1e6:.1f}M params, "
        f"median of {args.repeats}; {env['date']}; {env['machine']}; jax {env['jax']}; "
        f"torch {env['torch']}")
  print("| update | ms |\n|---|---|")
  for name, ms in rows:
    print(f"| {name} | {ms:.1f} |")


if __name__ == "__main__":
  main()
