"""The first-stage train step: reconstruction + KL for the KL autoencoder.

Loss per example: sum over pixels of |x - x_rec| (L1, plus l2_weight * squared error), plus
kl_weight * KL(q(z|x) || N(0, I)) summed over latent dims; averaged over the batch (the LDM
paper's normalization, with kl_weight about 1e-6). Perceptual and adversarial terms come with the
first-stage losses of issue 5.
"""

import dataclasses
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import optax

from latent_diffusion_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian
from latent_diffusion_jax.training.diffusion_step import images_to_float
from latent_diffusion_jax.training.state import TrainState
from latent_diffusion_jax.training.update import accumulate_gradients, apply_update


@dataclasses.dataclass(frozen=True)
class AutoencoderTask:
  vae: AutoencoderKL
  kl_weight: float = 1e-6
  l2_weight: float = 0.0


def psnr(x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
  """Peak signal-to-noise ratio in dB of images in [-1, 1], per example."""
  mse = jnp.mean((jnp.clip(x, -1, 1) - jnp.clip(y, -1, 1)) ** 2 / 4.0, axis=(1, 2, 3))
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def _loss_fn(task: AutoencoderTask, params: Any, batch: Dict[str, jnp.ndarray], rng: jax.Array):
  x = images_to_float(batch["images"])
  recon, moments = task.vae.apply({"params": params["vae"]}, x, rng)
  recon = recon.astype(jnp.float32)
  err = recon - x
  rec = jnp.sum(jnp.abs(err) + task.l2_weight * err**2, axis=(1, 2, 3))
  kl = DiagonalGaussian(moments.astype(jnp.float32)).kl()
  loss = jnp.mean(rec + task.kl_weight * kl)
  aux = {"l1": jnp.mean(jnp.abs(err), axis=(1, 2, 3)), "kl": kl, "psnr": psnr(recon, x)}
  return loss, aux


def make_train_step(task: AutoencoderTask, tx: optax.GradientTransformation,
                    learning_rate: Callable, *, ema_decay: float,
                    grad_accum_steps: int = 1) -> Callable:
  """Builds `train_step(state, batch) -> (state, metrics)` for the autoencoder."""

  def train_step(state: TrainState, batch: Dict[str, jnp.ndarray]) -> Tuple[TrainState, Dict]:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grad_fn = jax.value_and_grad(lambda p, mb, r: _loss_fn(task, p, mb, r), has_aux=True)
    (loss, aux), grads = accumulate_gradients(grad_fn, state.params, batch, rng, grad_accum_steps)
    new_state, metrics = apply_update(state, grads, loss, tx, learning_rate, ema_decay)
    metrics.update({k: jnp.mean(v) for k, v in aux.items()})
    return new_state, metrics

  return train_step


def reconstruct(vae: AutoencoderKL, params: Any, images: jnp.ndarray) -> jnp.ndarray:
  """Deterministic reconstruction (posterior mode) of uint8 or [-1, 1] images, in [-1, 1]."""
  recon, _ = vae.apply({"params": params}, images_to_float(images))
  return jnp.clip(recon.astype(jnp.float32), -1.0, 1.0)
