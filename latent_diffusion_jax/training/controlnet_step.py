"""The ControlNet train step: a pure function (state, batch, frozen, scale) -> (state, metrics).

Only the ControlNet is trained (`state.params["controlnet"]`). The base UNet, the first stage and
the text encoder arrive in `frozen` as step arguments, placed on the mesh like the trained params
and never in the optimizer state. The ControlNet sees the noisy latents, the timestep, the text
context and the batch's "control" image (float [B, H, W, C] in [0, 1]); its residuals join the
frozen UNet's skip connections and middle block, and the UNet's usual diffusion loss trains it.
Prompts are replaced by the empty one at `caption_dropout` (the ControlNet paper: 50%), so the
control image alone must carry the layout.
"""

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from latent_diffusion_jax.diffusion import objectives, schedules
from latent_diffusion_jax.models.conditioners.base import Conditioner
from latent_diffusion_jax.training.diffusion_step import (conditioning, encode_latents,
                                                          step_from_loss)


@dataclasses.dataclass(frozen=True)
class ControlNetTask:
  """The static pieces a ControlNet train step closes over."""
  controlnet: nn.Module
  unet: nn.Module
  vae: nn.Module
  conditioner: Optional[Conditioner]  # the base model's, frozen
  schedule: schedules.NoiseSchedule
  prediction_type: str
  caption_dropout: float = 0.5
  conditioning_scale: float = 1.0
  num_buckets: int = 10


def controlled_prediction(task: ControlNetTask, controlnet_params: Any, unet_params: Any,
                          x_t: jnp.ndarray, t: jnp.ndarray, ctx: jnp.ndarray,
                          control: jnp.ndarray, *, deterministic: bool = True,
                          rngs: Optional[dict] = None) -> jnp.ndarray:
  """The frozen UNet's prediction with the ControlNet's residuals added."""
  down, mid = task.controlnet.apply(
      {"params": controlnet_params}, x_t, t, ctx, control.astype(x_t.dtype),
      task.conditioning_scale, deterministic=deterministic, rngs=rngs)
  return task.unet.apply({"params": unet_params}, x_t, t, ctx, None, True, down, mid)


def _loss_fn(task: ControlNetTask, params: Any, frozen: Any, batch: Dict[str, jnp.ndarray],
             rng: jax.Array, scale_factor: jnp.ndarray):
  r_lat, r_t, r_noise, r_drop, r_dropout = jax.random.split(rng, 5)
  z = encode_latents(task, frozen["vae"], batch, r_lat) * scale_factor
  b = z.shape[0]
  ctx = conditioning(task, {}, frozen, batch, r_drop, b).context
  t = jax.random.randint(r_t, (b,), 0, task.schedule.num_timesteps)
  noise = jax.random.normal(r_noise, z.shape, z.dtype)
  x_t = schedules.add_noise(task.schedule, z, noise, t)
  unet_params = jax.lax.stop_gradient(frozen["unet"])
  out = controlled_prediction(task, params["controlnet"], unet_params, x_t, t, ctx,
                              batch["control"], deterministic=False, rngs={"dropout": r_dropout})
  target = objectives.prediction_target(task.prediction_type, task.schedule, z, noise, t)
  per_example = objectives.diffusion_loss(out.astype(jnp.float32), target, jnp.ones((b,)))
  return per_example.mean(), (per_example, t)


def make_train_step(task: ControlNetTask, tx: optax.GradientTransformation,
                    learning_rate: Callable[[jnp.ndarray], jnp.ndarray], *, ema_decay: float,
                    grad_accum_steps: int = 1) -> Callable:
  """Builds `train_step(state, batch, frozen, scale_factor) -> (state, metrics)`; `frozen` holds
  "unet", "vae", the frozen conditioner's params under its param_key ("text_encoder") and
  "null_inputs" (the empty prompt's token ids)."""
  return step_from_loss(functools.partial(_loss_fn, task), tx, learning_rate,
                        ema_decay=ema_decay, grad_accum_steps=grad_accum_steps,
                        num_timesteps=task.schedule.num_timesteps, num_buckets=task.num_buckets)
