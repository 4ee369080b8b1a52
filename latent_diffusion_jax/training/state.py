"""Train state, optimizer and EMA shared by the diffusion and autoencoder trainers."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections as mc
import optax
from latent_diffusion_jax.core.errors import UserInputError


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a pytree of (sharded) arrays.

  Attributes:
    step: optimizer updates done so far.
    params: trained params, e.g. {"unet": ..., "text_encoder": ...}.
    opt_state: optax state of `params`.
    ema_params: exponential moving average of `params` (the same tree), or None.
    rng: raw PRNG key data (uint32); per-step keys are `fold_in(rng, step)`.
    nonfinite_skips: updates dropped because the loss or gradient was not finite.
  """
  step: jnp.ndarray
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jnp.ndarray
  nonfinite_skips: jnp.ndarray


def learning_rate_schedule(cfg: mc.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warmup then constant or cosine decay."""
  warmup = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
  if cfg.schedule == "constant":
    after = optax.constant_schedule(cfg.learning_rate)
  elif cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(cfg.learning_rate, max(num_steps - cfg.warmup_steps, 1),
                                        alpha=cfg.end_learning_rate_factor)
  else:
    raise UserInputError(f"Unknown optimizer.schedule {cfg.schedule!r}; valid: constant, cosine.")
  return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def decay_mask(params: Any) -> Any:
  """Weight decay applies to matrices and conv kernels (ndim >= 2), not to biases or norm scales."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: mc.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  """AdamW with warmup schedule, decay mask and global-norm clipping.

  Gradient accumulation happens in the train step (a scan over micro-batches), so that one call of
  the step is one optimizer update and `state.step` counts updates.
  """
  parts = []
  if cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  parts.append(optax.adamw(learning_rate_schedule(cfg, num_steps), b1=cfg.b1, b2=cfg.b2,
                           eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def ema_decay_at(decay: float, updates: jnp.ndarray) -> jnp.ndarray:
  """Warmed-up EMA decay after `updates` updates: min(decay, (1 + n) / (10 + n))."""
  n = updates.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def ema_update(ema: Any, params: Any, decay: jnp.ndarray) -> Any:
  return jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p.astype(e.dtype), ema, params)


def global_norm(tree: Any) -> jnp.ndarray:
  return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
