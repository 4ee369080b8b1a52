"""Jittable samplers: DDPM, DDIM and DPM-Solver++ 2M, plus classifier-free guidance.

Each sampler reproduces the update rule and timestep selection of the
diffusers scheduler of the same name (DDPMScheduler, DDIMScheduler,
DPMSolverMultistepScheduler with algorithm_type="dpmsolver++",
solver_order=2), so a JAX port of a diffusers pipeline samples the same
trajectory given the same model and initial noise.

The whole denoising loop is one `lax.fori_loop`: the model is traced once and
the loop compiles once per (shape, num_steps, sampler settings). Settings are
static Python values; schedule, x_T and rng may be traced.

Stable Diffusion 1.x/2.x pipeline settings: DDIM with timestep_spacing
"leading", steps_offset=1, set_alpha_to_one=False; DPM-Solver++ with its
default "linspace" spacing.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion_jax.diffusion import objectives
from latent_diffusion_jax.diffusion import schedules
from latent_diffusion_jax.diffusion import timesteps as timesteps_lib
from latent_diffusion_jax.core.errors import UserInputError

# denoise_fn(x_t [B, ...], t [B] int32) -> model output shaped like x_t.
DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")
_DEFAULT_SPACING = {"ddpm": "leading", "ddim": "leading", "dpmpp_2m": "linspace"}


def _alphas_cumprod_at(schedule: schedules.NoiseSchedule, t: jnp.ndarray,
                       before_start: jnp.ndarray | float) -> jnp.ndarray:
  """alphas_cumprod[t], or `before_start` for the virtual timestep t < 0."""
  acp = schedule.alphas_cumprod[jnp.maximum(t, 0)]
  return jnp.where(t >= 0, acp, jnp.asarray(before_start, jnp.float32))


def _maybe_clip(x0: jnp.ndarray, clip_sample: bool, clip_sample_range: float) -> jnp.ndarray:
  return jnp.clip(x0, -clip_sample_range, clip_sample_range) if clip_sample else x0


def ddpm_step(schedule: schedules.NoiseSchedule, model_output: jnp.ndarray,
              x_t: jnp.ndarray, t: jnp.ndarray, prev_t: jnp.ndarray,
              noise: jnp.ndarray, *, prediction_type: str = "epsilon",
              clip_sample: bool = False,
              clip_sample_range: float = 1.0) -> jnp.ndarray:
  """One ancestral DDPM step x_t -> x_prev_t with "fixed_small" variance.

  Args:
    schedule: the noise schedule.
    model_output: denoiser output at (x_t, t).
    x_t: current sample.
    t: scalar int timestep.
    prev_t: scalar int timestep to step to; -1 means the clean end point.
    noise: standard normal noise shaped like x_t; ignored when t == 0.
    prediction_type: one of objectives.PREDICTION_TYPES.
    clip_sample: clip the predicted x0 to [-clip_sample_range, range].
    clip_sample_range: the clip bound.

  Returns:
    float32 sample at prev_t.
  """
  acp_t = schedule.alphas_cumprod[t]
  acp_prev = _alphas_cumprod_at(schedule, prev_t, 1.0)
  beta_prod_t = 1.0 - acp_t
  beta_prod_prev = 1.0 - acp_prev
  alpha_step = acp_t / acp_prev
  beta_step = 1.0 - alpha_step

  x0, _ = objectives.model_output_to_x0_eps_from_coeffs(
      prediction_type, acp_t**0.5, beta_prod_t**0.5, x_t, model_output)
  x0 = _maybe_clip(x0, clip_sample, clip_sample_range)

  # Posterior mean of q(x_prev | x_t, x0), Ho et al. 2020 eq. 7.
  x0_coeff = (acp_prev**0.5 * beta_step) / beta_prod_t
  xt_coeff = alpha_step**0.5 * beta_prod_prev / beta_prod_t
  mean = x0_coeff * x0 + xt_coeff * x_t

  variance = jnp.maximum(beta_prod_prev / beta_prod_t * beta_step, 1e-20)
  std = jnp.where(t > 0, variance**0.5, 0.0)
  return mean + std * noise


def ddim_step(schedule: schedules.NoiseSchedule, model_output: jnp.ndarray,
              x_t: jnp.ndarray, t: jnp.ndarray, prev_t: jnp.ndarray,
              noise: jnp.ndarray | None = None, *, eta: float = 0.0,
              prediction_type: str = "epsilon", set_alpha_to_one: bool = True,
              clip_sample: bool = False,
              clip_sample_range: float = 1.0) -> jnp.ndarray:
  """One DDIM step x_t -> x_prev_t (Song et al. 2021, eq. 12).

  Args:
    schedule: the noise schedule.
    model_output: denoiser output at (x_t, t).
    x_t: current sample.
    t: scalar int timestep.
    prev_t: scalar int timestep to step to; negative means past the start,
      where alphas_cumprod is 1 (set_alpha_to_one) or alphas_cumprod[0].
    noise: standard normal noise shaped like x_t; required when eta != 0.
    eta: 0 is deterministic DDIM, 1 matches DDPM's posterior variance.
    prediction_type: one of objectives.PREDICTION_TYPES.
    set_alpha_to_one: see prev_t; SD uses False.
    clip_sample: clip the predicted x0 to [-clip_sample_range, range].
    clip_sample_range: the clip bound.

  Returns:
    float32 sample at prev_t.
  """
  acp_t = schedule.alphas_cumprod[t]
  final_acp = 1.0 if set_alpha_to_one else schedule.alphas_cumprod[0]
  acp_prev = _alphas_cumprod_at(schedule, prev_t, final_acp)
  beta_prod_t = 1.0 - acp_t

  x0, eps = objectives.model_output_to_x0_eps_from_coeffs(
      prediction_type, acp_t**0.5, beta_prod_t**0.5, x_t, model_output)
  x0 = _maybe_clip(x0, clip_sample, clip_sample_range)

  variance = ((1.0 - acp_prev) / beta_prod_t) * (1.0 - acp_t / acp_prev)
  std = eta * variance**0.5
  x_prev = acp_prev**0.5 * x0 + (1.0 - acp_prev - std**2)**0.5 * eps
  if _is_zero(eta):
    return x_prev
  if noise is None:
    raise UserInputError("ddim_step with eta != 0 needs `noise`.")
  return x_prev + std * noise


def _is_zero(value: Any) -> bool:
  """True for a static zero; a traced value counts as possibly non-zero."""
  return isinstance(value, (int, float)) and value == 0


def _sigma_to_alpha_sigma(sigma: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Maps the VE sigma sqrt((1 - acp) / acp) to VP (alpha_t, sigma_t)."""
  alpha = 1.0 / (sigma**2 + 1.0)**0.5
  return alpha, sigma * alpha


def dpm_solver_sigmas(schedule: schedules.NoiseSchedule, timesteps: np.ndarray,
                      final_sigmas_type: str = "zero") -> jnp.ndarray:
  """VE sigmas at the solver timesteps plus the final sigma, float32 [n + 1].

  Args:
    schedule: the noise schedule.
    timesteps: int solver timesteps, descending.
    final_sigmas_type: "zero" (end exactly at x0) or "sigma_min" (end at the
      noise level of timestep 0).

  Returns:
    float32 [len(timesteps) + 1] sigmas.
  """
  if final_sigmas_type not in ("zero", "sigma_min"):
    raise UserInputError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}.")
  acp = schedule.alphas_cumprod
  # A zero-terminal-SNR schedule has acp[-1] == 0, i.e. infinite sigma;
  # diffusers substitutes 2**-24 and so do we.
  acp = acp.at[-1].set(jnp.where(acp[-1] == 0, 2.0**-24, acp[-1]))
  all_sigmas = ((1.0 - acp) / acp)**0.5
  last = 0.0 if final_sigmas_type == "zero" else all_sigmas[0]
  return jnp.concatenate([all_sigmas[jnp.asarray(timesteps)],
                          jnp.reshape(jnp.asarray(last, jnp.float32), (1,))])


def dpm_solver_pp_2m_update(x: jnp.ndarray, x0: jnp.ndarray, prev_x0: jnp.ndarray,
                            sigma_prev_step: jnp.ndarray, sigma_s: jnp.ndarray,
                            sigma_t: jnp.ndarray,
                            second_order: jnp.ndarray) -> jnp.ndarray:
  """One multistep DPM-Solver++(2M) update (Lu et al. 2022, midpoint form).

  Args:
    x: current sample at VE noise level sigma_s.
    x0: data prediction at the current step.
    prev_x0: data prediction at the previous step (unused if first order).
    sigma_prev_step: VE sigma of the previous step.
    sigma_s: VE sigma of the current step.
    sigma_t: VE sigma to step to (0 lands on x0).
    second_order: bool scalar; False takes the first-order (DDIM) step.

  Returns:
    float32 sample at sigma_t.
  """
  alpha_t, sig_t = _sigma_to_alpha_sigma(sigma_t)
  alpha_s, sig_s = _sigma_to_alpha_sigma(sigma_s)
  alpha_r, sig_r = _sigma_to_alpha_sigma(sigma_prev_step)
  lambda_t = jnp.log(alpha_t) - jnp.log(sig_t)
  lambda_s = jnp.log(alpha_s) - jnp.log(sig_s)
  lambda_r = jnp.log(alpha_r) - jnp.log(sig_r)
  h = lambda_t - lambda_s
  first = (sig_t / sig_s) * x - (alpha_t * (jnp.exp(-h) - 1.0)) * x0
  # Guard r: at a sigma_t = 0 step h is inf and the unused branch would be nan.
  r = jnp.where(second_order, (lambda_s - lambda_r) / h, 1.0)
  d1 = (1.0 / r) * (x0 - prev_x0)
  second = first - 0.5 * (alpha_t * (jnp.exp(-h) - 1.0)) * d1
  return jnp.where(second_order, second, first)


def _model_call(denoise_fn: DenoiseFn, x: jnp.ndarray, t: jnp.ndarray,
                dtype) -> jnp.ndarray:
  t_batch = jnp.full((x.shape[0],), t, jnp.int32)
  return denoise_fn(x.astype(dtype), t_batch).astype(jnp.float32)


def _ancestral_loop(step_fn, denoise_fn: DenoiseFn, x_T: jnp.ndarray,
                    rng: jax.Array | None, ts: np.ndarray,
                    prev_ts: np.ndarray, needs_noise: bool) -> jnp.ndarray:
  """Runs x <- step_fn(output, x, t, prev_t, noise) over the timesteps."""
  if needs_noise and rng is None:
    raise UserInputError("This sampler is stochastic and needs an rng key.")
  ts_arr = jnp.asarray(ts, jnp.int32)
  prev_arr = jnp.asarray(prev_ts, jnp.int32)

  def body(i, x):
    t, prev_t = ts_arr[i], prev_arr[i]
    output = _model_call(denoise_fn, x, t, x_T.dtype)
    # fold_in on the step index: the same seed gives the same noise per step.
    noise = (jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
             if needs_noise else None)
    return step_fn(output, x, t, prev_t, noise)

  x = jax.lax.fori_loop(0, len(ts), body, x_T.astype(jnp.float32))
  return x.astype(x_T.dtype)


def _dpm_solver_loop(denoise_fn: DenoiseFn, schedule: schedules.NoiseSchedule,
                     x_T: jnp.ndarray, ts: np.ndarray, prediction_type: str,
                     lower_order_final: bool, final_sigmas_type: str) -> jnp.ndarray:
  """DPM-Solver++ 2M: first order at the first step, second order after."""
  n = len(ts)
  sigmas = dpm_solver_sigmas(schedule, ts, final_sigmas_type)
  # diffusers' step-order rule for solver_order=2, fixed by the static n.
  second_order = np.arange(n) > 0
  if final_sigmas_type == "zero" or (lower_order_final and n < 15):
    second_order[-1] = False
  second_order_arr = jnp.asarray(second_order)
  ts_arr = jnp.asarray(ts, jnp.int32)

  def body(i, carry):
    x, prev_x0 = carry
    sigma_s = sigmas[i]
    alpha_s, sig_s = _sigma_to_alpha_sigma(sigma_s)
    output = _model_call(denoise_fn, x, ts_arr[i], x_T.dtype)
    x0, _ = objectives.model_output_to_x0_eps_from_coeffs(
        prediction_type, alpha_s, sig_s, x, output)
    x = dpm_solver_pp_2m_update(x, x0, prev_x0, sigmas[jnp.maximum(i - 1, 0)], sigma_s,
                                sigmas[i + 1], second_order_arr[i])
    return x, x0

  x = x_T.astype(jnp.float32)
  x, _ = jax.lax.fori_loop(0, n, body, (x, jnp.zeros_like(x)))
  return x.astype(x_T.dtype)


def sample(denoise_fn: DenoiseFn, schedule: schedules.NoiseSchedule,
           x_T: jnp.ndarray, rng: jax.Array | None = None, *,
           sampler: str = "ddim", num_steps: int = 50, eta: float = 0.0,
           prediction_type: str = "epsilon", timestep_spacing: str | None = None,
           steps_offset: int = 0, set_alpha_to_one: bool = True,
           clip_sample: bool = False, clip_sample_range: float = 1.0,
           lower_order_final: bool = True,
           final_sigmas_type: str = "zero") -> jnp.ndarray:
  """Runs a full reverse diffusion from x_T to x_0 as one lax.fori_loop.

  Defaults are the diffusers scheduler defaults, so equal arguments give the
  diffusers trajectory (see the module docstring for Stable Diffusion's).

  Args:
    denoise_fn: pure function (x_t [B, ...], t [B] int32) -> model output.
    schedule: the training noise schedule.
    x_T: initial noise [B, ...]; the result has its dtype (math is float32).
    rng: PRNG key; required by "ddpm" and by "ddim" with eta != 0.
    sampler: "ddpm", "ddim" or "dpmpp_2m" (DPM-Solver++ 2M).
    num_steps: number of model evaluations (see timesteps_lib for the
      "trailing" corner case that adds one).
    eta: DDIM stochasticity; must be 0 for the other samplers.
    prediction_type: what denoise_fn predicts, one of
      objectives.PREDICTION_TYPES.
    timestep_spacing: "leading", "trailing" or "linspace"; None picks the
      diffusers default of the sampler ("leading" for DDPM/DDIM, "linspace"
      for DPM-Solver++).
    steps_offset: offset added to "leading" timesteps (SD uses 1).
    set_alpha_to_one: DDIM only; alphas_cumprod past the last step is 1 if
      True, else alphas_cumprod[0] (SD uses False).
    clip_sample: DDPM/DDIM only; clip predicted x0 to +-clip_sample_range.
    clip_sample_range: the clip bound.
    lower_order_final: DPM-Solver++ only; first-order last step when fewer
      than 15 steps.
    final_sigmas_type: DPM-Solver++ only; "zero" or "sigma_min".

  Returns:
    The final sample x_0, shaped and typed like x_T.
  """
  if sampler not in SAMPLERS:
    raise UserInputError(f"Unknown sampler {sampler!r}; valid samplers are {SAMPLERS}.")
  if prediction_type not in objectives.PREDICTION_TYPES:
    raise UserInputError(f"Unknown prediction_type {prediction_type!r}; valid types are "
                     f"{objectives.PREDICTION_TYPES}.")
  if sampler != "ddim" and not _is_zero(eta):
    raise UserInputError(f"eta is a DDIM option; sampler {sampler!r} needs eta=0.")
  spacing = timestep_spacing or _DEFAULT_SPACING[sampler]
  num_train = schedule.num_timesteps

  if sampler == "dpmpp_2m":
    ts = timesteps_lib.dpm_solver_timesteps(num_train, num_steps, spacing, steps_offset)
    return _dpm_solver_loop(denoise_fn, schedule, x_T, ts, prediction_type,
                            lower_order_final, final_sigmas_type)

  ts = timesteps_lib.ddim_timesteps(num_train, num_steps, spacing, steps_offset)
  if sampler == "ddpm":
    prev_ts = timesteps_lib.ddpm_previous_timesteps(ts)

    def step_fn(output, x, t, prev_t, noise):
      return ddpm_step(schedule, output, x, t, prev_t, noise, prediction_type=prediction_type,
                       clip_sample=clip_sample, clip_sample_range=clip_sample_range)

    return _ancestral_loop(step_fn, denoise_fn, x_T, rng, ts, prev_ts, needs_noise=True)

  prev_ts = timesteps_lib.ddim_previous_timesteps(ts, num_train, num_steps)

  def ddim_fn(output, x, t, prev_t, noise):
    return ddim_step(schedule, output, x, t, prev_t, noise, eta=eta,
                     prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one,
                     clip_sample=clip_sample, clip_sample_range=clip_sample_range)

  return _ancestral_loop(ddim_fn, denoise_fn, x_T, rng, ts, prev_ts,
                         needs_noise=not _is_zero(eta))


def classifier_free_guidance(model_fn: Callable[[jnp.ndarray, jnp.ndarray, Any], jnp.ndarray],
                             cond: Any, uncond: Any, scale: float | jnp.ndarray) -> DenoiseFn:
  """Wraps a conditional model into a guided denoise_fn (Ho & Salimans 2022).

  The conditional and unconditional passes run as one call on a doubled
  batch, which is what keeps the accelerator busy at small batch sizes.

  Args:
    model_fn: (x [B, ...], t [B], context) -> output [B, ...].
    cond: conditioning context for the batch (array or pytree of arrays with
      leading batch axis B), e.g. text embeddings.
    uncond: the "empty prompt" context, same structure and shapes as cond.
    scale: guidance scale w; 1 reproduces the conditional model.

  Returns:
    denoise_fn(x_t, t) = uncond_out + scale * (cond_out - uncond_out).
  """
  context = jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)

  def denoise_fn(x_t: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    out = model_fn(jnp.concatenate([x_t, x_t], axis=0), jnp.concatenate([t, t], axis=0), context)
    out_uncond, out_cond = jnp.split(out, 2, axis=0)
    return out_uncond + scale * (out_cond - out_uncond)

  return denoise_fn
