"""Training objectives: prediction targets, loss weights and the loss itself.

All functions are pure jnp and jit-friendly; string arguments (prediction
type, weighting) are static Python values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from latent_diffusion_jax.diffusion import schedules
from latent_diffusion_jax.core.errors import UserInputError

# diffusers' names, so scheduler/model configs can be shared verbatim.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
LOSS_WEIGHTINGS = ("uniform", "min_snr")


def _check_prediction_type(prediction_type: str) -> None:
  if prediction_type not in PREDICTION_TYPES:
    raise UserInputError(
        f"Unknown prediction_type {prediction_type!r}; valid types are {PREDICTION_TYPES}.")


def prediction_target(prediction_type: str, schedule: schedules.NoiseSchedule,
                      x0: jnp.ndarray, noise: jnp.ndarray,
                      t: jnp.ndarray) -> jnp.ndarray:
  """The regression target of the denoiser for a given parameterisation.

  Args:
    prediction_type: "epsilon" (the noise), "v_prediction" (the velocity) or
      "sample" (x0 itself).
    schedule: the noise schedule.
    x0: clean samples [B, ...].
    noise: the noise used to build x_t, same shape as x0.
    t: int timesteps [B].

  Returns:
    The target, same shape as x0.
  """
  _check_prediction_type(prediction_type)
  if prediction_type == "epsilon":
    return noise
  if prediction_type == "v_prediction":
    return schedules.velocity(schedule, x0, noise, t)
  return x0


def model_output_to_x0_eps_from_coeffs(
    prediction_type: str, alpha: jnp.ndarray, sigma: jnp.ndarray,
    x_t: jnp.ndarray, model_output: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Converts a model output to (x0, eps) given x_t = alpha * x0 + sigma * eps.

  Samplers whose alpha/sigma do not come straight from the table (DPM-Solver
  derives them from sigma ratios) use this form.

  Args:
    prediction_type: one of PREDICTION_TYPES.
    alpha: sqrt(alphas_cumprod_t), broadcastable to x_t.
    sigma: sqrt(1 - alphas_cumprod_t), broadcastable to x_t.
    x_t: the noisy sample.
    model_output: the denoiser output at x_t.

  Returns:
    (x0, eps) predictions, each shaped like x_t.
  """
  _check_prediction_type(prediction_type)
  if prediction_type == "epsilon":
    eps = model_output
    x0 = (x_t - sigma * eps) / alpha
  elif prediction_type == "v_prediction":
    x0 = alpha * x_t - sigma * model_output
    eps = alpha * model_output + sigma * x_t
  else:
    x0 = model_output
    eps = (x_t - alpha * x0) / sigma
  return x0, eps


def model_output_to_x0_eps(prediction_type: str, schedule: schedules.NoiseSchedule,
                           x_t: jnp.ndarray, t: jnp.ndarray,
                           model_output: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Recovers (x0, eps) from a model output at int timesteps t.

  Args:
    prediction_type: one of PREDICTION_TYPES.
    schedule: the noise schedule.
    x_t: noisy samples [B, ...].
    t: int timesteps [B].
    model_output: the denoiser output, same shape as x_t.

  Returns:
    (x0, eps) predictions, each shaped like x_t.
  """
  acp = schedules.gather_per_example(schedule.alphas_cumprod, t, x_t.ndim)
  return model_output_to_x0_eps_from_coeffs(
      prediction_type, jnp.sqrt(acp), jnp.sqrt(1.0 - acp), x_t, model_output)


def loss_weights(weighting: str, prediction_type: str,
                 schedule: schedules.NoiseSchedule, t: jnp.ndarray,
                 snr_gamma: float = 5.0) -> jnp.ndarray:
  """Per-example loss weights.

  "min_snr" is Min-SNR-gamma (Hang et al. 2023): the x0-space weight
  min(SNR, gamma), converted to the parameterisation being trained (divide by
  SNR for epsilon, by SNR + 1 for v).

  Args:
    weighting: "uniform" or "min_snr".
    prediction_type: one of PREDICTION_TYPES.
    schedule: the noise schedule.
    t: int timesteps [B].
    snr_gamma: the clamp gamma of min-SNR (5 in the paper).

  Returns:
    float32 weights [B].
  """
  _check_prediction_type(prediction_type)
  if weighting not in LOSS_WEIGHTINGS:
    raise UserInputError(f"Unknown loss weighting {weighting!r}; valid ones are {LOSS_WEIGHTINGS}.")
  if weighting == "uniform":
    return jnp.ones(t.shape, jnp.float32)
  snr = schedules.snr(schedule, t)
  clipped = jnp.minimum(snr, snr_gamma)
  if prediction_type == "epsilon":
    # min(snr, gamma) / snr -> 1 as snr -> 0; a zero-terminal-SNR step would
    # otherwise give 0/0.
    return jnp.where(snr > 0, clipped / jnp.where(snr > 0, snr, 1.0), 1.0)
  if prediction_type == "v_prediction":
    return clipped / (snr + 1.0)
  return clipped


def sample_noise(rng: jax.Array, shape: tuple[int, ...], offset_noise: float = 0.0,
                 dtype=jnp.float32) -> jnp.ndarray:
  """Standard normal noise, optionally with offset noise.

  Offset noise (Guttenberg 2023) adds offset_noise * N(0, 1) that is constant
  over the spatial axes, so the model learns to change the mean brightness of
  an image, which i.i.d. noise barely perturbs.

  Args:
    rng: PRNG key.
    shape: channels-last shape [B, ..., C], at least 2-D.
    offset_noise: scale of the per-(batch, channel) offset; 0 disables it.
    dtype: output dtype.

  Returns:
    Noise of the given shape and dtype.
  """
  if len(shape) < 2:
    raise UserInputError(f"sample_noise needs a [B, ..., C] shape, got {shape}.")
  noise_rng, offset_rng = jax.random.split(rng)
  noise = jax.random.normal(noise_rng, shape, jnp.float32)
  if offset_noise:
    offset_shape = (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],)
    noise = noise + offset_noise * jax.random.normal(offset_rng, offset_shape, jnp.float32)
  return noise.astype(dtype)


def diffusion_loss(model_output: jnp.ndarray, target: jnp.ndarray,
                   weights: jnp.ndarray | None = None) -> jnp.ndarray:
  """Weighted per-example mean squared error.

  Args:
    model_output: denoiser output [B, ...].
    target: regression target, same shape.
    weights: optional [B] per-example weights (see loss_weights).

  Returns:
    float32 [B] losses; take the mean for the scalar training loss.
  """
  err = jnp.square(model_output.astype(jnp.float32) - target.astype(jnp.float32))
  per_example = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
  if weights is not None:
    per_example = per_example * weights.astype(jnp.float32)
  return per_example


def loss_per_timestep_bucket(per_example_loss: jnp.ndarray, t: jnp.ndarray,
                             num_timesteps: int,
                             num_buckets: int = 10) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Sums losses into equal-width timestep buckets, for logging.

  Returning sums and counts (not means) lets callers accumulate over steps
  and devices before dividing.

  Args:
    per_example_loss: [B] losses.
    t: int timesteps [B] in [0, num_timesteps).
    num_timesteps: number of training timesteps T.
    num_buckets: number of buckets; bucket k covers
      [k * T / num_buckets, (k + 1) * T / num_buckets).

  Returns:
    (sums, counts): float32 arrays [num_buckets].
  """
  bucket = jnp.clip(t.astype(jnp.int32) * num_buckets // num_timesteps, 0, num_buckets - 1)
  sums = jax.ops.segment_sum(per_example_loss.astype(jnp.float32), bucket, num_segments=num_buckets)
  counts = jax.ops.segment_sum(jnp.ones_like(per_example_loss, jnp.float32), bucket,
                               num_segments=num_buckets)
  return sums, counts
