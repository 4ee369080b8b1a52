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

Image-conditioned sampling hooks into the same loop:
- `start_step` starts part-way down the timesteps from a partly noised x
  (SDEdit / img2img; `start_step_for_strength` is diffusers' `get_timesteps`).
- `step_hook(x, next_t)` rewrites the sample after every step, e.g. inpainting
  with any text-to-image model by pasting the known region, re-noised to the
  next timestep (`renoise_known_region`).
- `dynamic_threshold` is Imagen's dynamic thresholding of the predicted x0
  (Saharia et al. 2022, sec. 2.3; diffusers' `thresholding=True`): per sample,
  s = max(percentile(|x0|, p), 1) clipped to `sample_max_value`, then x0 is
  clipped to [-s, s] and divided by s. It assumes x0 lives in [-1, 1]: use it
  for models that denoise pixels, or latents trained to stay in [-1, 1]. It
  does not apply to Stable Diffusion style latent models, whose scaled latents
  have unit variance but no bound (values of 3-4 are normal): thresholding
  them shrinks the latent and washes the decoded image out.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

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
# Images per guidance pass from which CPU runs the two passes as separate calls
# (classifier_free_guidance): measured faster at 8, slower at 1; each call is compiled apart,
# so smaller batches (most tests, quick previews) keep one call and one compiled UNet.
SEPARATE_PASSES_MIN_BATCH = 8


def _alphas_cumprod_at(schedule: schedules.NoiseSchedule, t: jnp.ndarray,
                       before_start: jnp.ndarray | float) -> jnp.ndarray:
  """alphas_cumprod[t], or `before_start` for the virtual timestep t < 0."""
  acp = schedule.alphas_cumprod[jnp.maximum(t, 0)]
  return jnp.where(t >= 0, acp, jnp.asarray(before_start, jnp.float32))


# hook(x [B, ...], next_t scalar int32) -> x: runs after every step; next_t is the timestep the
# sample is now at (-1 after the last step, where the sample is clean).
StepHook = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def _maybe_clip(x0: jnp.ndarray, clip_sample: bool, clip_sample_range: float) -> jnp.ndarray:
  return jnp.clip(x0, -clip_sample_range, clip_sample_range) if clip_sample else x0


def dynamic_threshold(x0: jnp.ndarray, percentile: float,
                      sample_max_value: float = 1.0) -> jnp.ndarray:
  """Imagen's dynamic thresholding of predicted samples (diffusers' `_threshold_sample`).

  Args:
    x0: predicted clean samples [B, ...], meant to lie in [-1, 1].
    percentile: the quantile p of |x0| per sample (Imagen and diffusers use 0.995).
    sample_max_value: the largest threshold s allowed.

  Returns:
    clip(x0, -s, s) / s with s = clip(quantile(|x0|, p), 1, sample_max_value) per sample.
  """
  flat = jnp.abs(x0.astype(jnp.float32)).reshape(x0.shape[0], -1)
  s = jnp.clip(jnp.quantile(flat, percentile, axis=1), 1.0, sample_max_value)
  s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
  return (jnp.clip(x0, -s, s) / s).astype(x0.dtype)


def _x0_transform(clip_sample: bool, clip_sample_range: float,
                  threshold: Optional[float], sample_max_value: float):
  def transform(x0):
    if threshold is not None:
      return dynamic_threshold(x0, threshold, sample_max_value)
    return _maybe_clip(x0, clip_sample, clip_sample_range)
  return transform


def start_step_for_strength(num_steps: int, strength: float) -> int:
  """The first of `num_steps` steps an image-to-image run takes (diffusers' `get_timesteps`).

  strength 1 starts from pure noise (step 0); strength s skips the first
  num_steps - int(num_steps * s) steps. A strength too small for one step is an error.
  """
  if not isinstance(strength, (int, float, np.floating)) or not 0.0 < strength <= 1.0:
    raise UserInputError(f"strength must lie in (0, 1], got {strength!r}.")
  init_steps = min(int(num_steps * strength), num_steps)
  if init_steps < 1:
    raise UserInputError(f"strength {strength} leaves no denoising step of {num_steps}: "
                         f"use strength >= {1.0 / num_steps:.3g} or more steps.")
  return num_steps - init_steps


def sampler_timesteps(num_train_timesteps: int, sampler: str, num_steps: int,
                      timestep_spacing: Optional[str] = None, steps_offset: int = 0) -> np.ndarray:
  """The descending timesteps `sample` visits (the model is called once at each)."""
  if sampler not in SAMPLERS:
    raise UserInputError(f"Unknown sampler {sampler!r}; valid samplers are {SAMPLERS}.")
  spacing = timestep_spacing or _DEFAULT_SPACING[sampler]
  if sampler == "dpmpp_2m":
    return timesteps_lib.dpm_solver_timesteps(num_train_timesteps, num_steps, spacing, steps_offset)
  return timesteps_lib.ddim_timesteps(num_train_timesteps, num_steps, spacing, steps_offset)


def renoise_known_region(schedule: schedules.NoiseSchedule, known: jnp.ndarray,
                         keep: jnp.ndarray, noise: jnp.ndarray) -> StepHook:
  """The step hook of inpainting with a plain model (diffusers' 4-channel inpainting).

  After each step the region to keep is replaced by the known clean sample noised to the
  timestep the sample is now at (the clean sample itself after the last step), so the
  model only ever invents the masked region, consistently with its surroundings.

  Args:
    schedule: the noise schedule.
    known: clean samples [B, ...] of the known content.
    keep: 1 where `known` is kept, 0 where the model paints; broadcastable to `known`.
    noise: the noise the known region is noised with, shaped like `known` (diffusers reuses
      the initial noise).

  Returns:
    A `StepHook`.
  """
  def hook(x, next_t):
    t = jnp.full((x.shape[0],), jnp.maximum(next_t, 0), jnp.int32)
    noised = schedules.add_noise(schedule, known.astype(jnp.float32), noise.astype(jnp.float32), t)
    target = jnp.where(next_t >= 0, noised, known.astype(jnp.float32))
    return keep * target + (1.0 - keep) * x
  return hook


def ddpm_step(schedule: schedules.NoiseSchedule, model_output: jnp.ndarray,
              x_t: jnp.ndarray, t: jnp.ndarray, prev_t: jnp.ndarray,
              noise: jnp.ndarray, *, prediction_type: str = "epsilon",
              clip_sample: bool = False,
              clip_sample_range: float = 1.0,
              x0_fn: Optional[Callable[[jnp.ndarray], jnp.ndarray]] = None) -> jnp.ndarray:
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
    x0_fn: replaces clipping of the predicted x0 (e.g. dynamic thresholding).

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
  x0 = x0_fn(x0) if x0_fn is not None else _maybe_clip(x0, clip_sample, clip_sample_range)

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
              clip_sample_range: float = 1.0,
              x0_fn: Optional[Callable[[jnp.ndarray], jnp.ndarray]] = None) -> jnp.ndarray:
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
    x0_fn: replaces clipping of the predicted x0 (e.g. dynamic thresholding); the DDIM
      direction keeps the model's epsilon, as in diffusers.

  Returns:
    float32 sample at prev_t.
  """
  acp_t = schedule.alphas_cumprod[t]
  final_acp = 1.0 if set_alpha_to_one else schedule.alphas_cumprod[0]
  acp_prev = _alphas_cumprod_at(schedule, prev_t, final_acp)
  beta_prod_t = 1.0 - acp_t

  x0, eps = objectives.model_output_to_x0_eps_from_coeffs(
      prediction_type, acp_t**0.5, beta_prod_t**0.5, x_t, model_output)
  x0 = x0_fn(x0) if x0_fn is not None else _maybe_clip(x0, clip_sample, clip_sample_range)

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


def _next_timesteps(ts: np.ndarray) -> jnp.ndarray:
  """The timestep the sample is at after each step: the next entry, -1 after the last."""
  return jnp.asarray(np.concatenate([ts[1:], [-1]]), jnp.int32)


def _ancestral_loop(step_fn, denoise_fn: DenoiseFn, x_T: jnp.ndarray,
                    rng: jax.Array | None, ts: np.ndarray,
                    prev_ts: np.ndarray, needs_noise: bool, first_step: int = 0,
                    step_hook: Optional[StepHook] = None) -> jnp.ndarray:
  """Runs x <- step_fn(output, x, t, prev_t, noise) over the timesteps from `first_step`."""
  if needs_noise and rng is None:
    raise UserInputError("This sampler is stochastic and needs an rng key.")
  ts_arr = jnp.asarray(ts, jnp.int32)
  prev_arr = jnp.asarray(prev_ts, jnp.int32)
  next_arr = _next_timesteps(ts)

  def body(i, x):
    t, prev_t = ts_arr[i], prev_arr[i]
    output = _model_call(denoise_fn, x, t, x_T.dtype)
    # fold_in on the step index: the same seed gives the same noise per step.
    noise = (jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
             if needs_noise else None)
    x = step_fn(output, x, t, prev_t, noise)
    return x if step_hook is None else step_hook(x, next_arr[i]).astype(jnp.float32)

  x = jax.lax.fori_loop(first_step, len(ts), body, x_T.astype(jnp.float32))
  return x.astype(x_T.dtype)


def _dpm_solver_loop(denoise_fn: DenoiseFn, schedule: schedules.NoiseSchedule,
                     x_T: jnp.ndarray, ts: np.ndarray, prediction_type: str,
                     lower_order_final: bool, final_sigmas_type: str, first_step: int = 0,
                     step_hook: Optional[StepHook] = None,
                     x0_fn: Optional[Callable[[jnp.ndarray], jnp.ndarray]] = None) -> jnp.ndarray:
  """DPM-Solver++ 2M: first order at the first step taken, second order after."""
  n = len(ts)
  sigmas = dpm_solver_sigmas(schedule, ts, final_sigmas_type)
  # diffusers' step-order rule for solver_order=2, fixed by the static n; a run started part-way
  # (set_begin_index) has no previous x0 at its first step, so that one is first order.
  second_order = np.arange(n) > first_step
  if final_sigmas_type == "zero" or (lower_order_final and n < 15):
    second_order[-1] = False
  second_order_arr = jnp.asarray(second_order)
  ts_arr = jnp.asarray(ts, jnp.int32)
  next_arr = _next_timesteps(ts)

  def body(i, carry):
    x, prev_x0 = carry
    sigma_s = sigmas[i]
    alpha_s, sig_s = _sigma_to_alpha_sigma(sigma_s)
    output = _model_call(denoise_fn, x, ts_arr[i], x_T.dtype)
    x0, _ = objectives.model_output_to_x0_eps_from_coeffs(
        prediction_type, alpha_s, sig_s, x, output)
    if x0_fn is not None:
      x0 = x0_fn(x0)
    x = dpm_solver_pp_2m_update(x, x0, prev_x0, sigmas[jnp.maximum(i - 1, 0)], sigma_s,
                                sigmas[i + 1], second_order_arr[i])
    if step_hook is not None:
      x = step_hook(x, next_arr[i]).astype(jnp.float32)
    return x, x0

  x = x_T.astype(jnp.float32)
  x, _ = jax.lax.fori_loop(first_step, n, body, (x, jnp.zeros_like(x)))
  return x.astype(x_T.dtype)


def sample(denoise_fn: DenoiseFn, schedule: schedules.NoiseSchedule,
           x_T: jnp.ndarray, rng: jax.Array | None = None, *,
           sampler: str = "ddim", num_steps: int = 50, eta: float = 0.0,
           prediction_type: str = "epsilon", timestep_spacing: str | None = None,
           steps_offset: int = 0, set_alpha_to_one: bool = True,
           clip_sample: bool = False, clip_sample_range: float = 1.0,
           lower_order_final: bool = True,
           final_sigmas_type: str = "zero", start_step: int = 0,
           step_hook: Optional[StepHook] = None,
           dynamic_threshold_percentile: Optional[float] = None,
           sample_max_value: float = 1.0) -> jnp.ndarray:
  """Runs a reverse diffusion from x_T (or a partly noised x) to x_0 as one lax.fori_loop.

  Defaults are the diffusers scheduler defaults, so equal arguments give the
  diffusers trajectory (see the module docstring for Stable Diffusion's).

  Args:
    denoise_fn: pure function (x_t [B, ...], t [B] int32) -> model output.
    schedule: the training noise schedule.
    x_T: initial sample [B, ...]: pure noise, or with `start_step` > 0 a sample noised to
      `sampler_timesteps(...)[start_step]`; the result has its dtype (math is float32).
    rng: PRNG key; required by "ddpm" and by "ddim" with eta != 0.
    sampler: "ddpm", "ddim" or "dpmpp_2m" (DPM-Solver++ 2M).
    num_steps: number of model evaluations of a full run (see timesteps_lib for the
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
    start_step: index of the first timestep to run (img2img; see
      `start_step_for_strength`); the steps before it are skipped, as diffusers does.
    step_hook: `StepHook` applied to the sample after every step (e.g.
      `renoise_known_region`).
    dynamic_threshold_percentile: Imagen's dynamic thresholding of x0 at this quantile
      (e.g. 0.995), for models whose x0 lies in [-1, 1] (see the module docstring; not for
      SD latents); replaces clip_sample.
    sample_max_value: the largest dynamic threshold.

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
  threshold = dynamic_threshold_percentile
  if threshold is not None and not 0.0 < threshold <= 1.0:
    raise UserInputError(f"dynamic_threshold_percentile must lie in (0, 1], got {threshold}.")
  num_train = schedule.num_timesteps
  ts = sampler_timesteps(num_train, sampler, num_steps, timestep_spacing, steps_offset)
  if not 0 <= start_step < len(ts):
    raise UserInputError(f"start_step must lie in [0, {len(ts)}), got {start_step}.")
  x0_fn = (None if threshold is None else
           _x0_transform(clip_sample, clip_sample_range, threshold, sample_max_value))

  if sampler == "dpmpp_2m":
    return _dpm_solver_loop(denoise_fn, schedule, x_T, ts, prediction_type,
                            lower_order_final, final_sigmas_type, start_step, step_hook, x0_fn)

  if sampler == "ddpm":
    prev_ts = timesteps_lib.ddpm_previous_timesteps(ts)

    def step_fn(output, x, t, prev_t, noise):
      return ddpm_step(schedule, output, x, t, prev_t, noise, prediction_type=prediction_type,
                       clip_sample=clip_sample, clip_sample_range=clip_sample_range, x0_fn=x0_fn)

    return _ancestral_loop(step_fn, denoise_fn, x_T, rng, ts, prev_ts, needs_noise=True,
                           first_step=start_step, step_hook=step_hook)

  prev_ts = timesteps_lib.ddim_previous_timesteps(ts, num_train, num_steps)

  def ddim_fn(output, x, t, prev_t, noise):
    return ddim_step(schedule, output, x, t, prev_t, noise, eta=eta,
                     prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one,
                     clip_sample=clip_sample, clip_sample_range=clip_sample_range, x0_fn=x0_fn)

  return _ancestral_loop(ddim_fn, denoise_fn, x_T, rng, ts, prev_ts,
                         needs_noise=not _is_zero(eta), first_step=start_step,
                         step_hook=step_hook)


def classifier_free_guidance(model_fn: Callable[[jnp.ndarray, jnp.ndarray, Any], jnp.ndarray],
                             cond: Any, uncond: Any, scale: float | jnp.ndarray,
                             separate_passes: Optional[bool] = None) -> DenoiseFn:
  """Wraps a conditional model into a guided denoise_fn (Ho & Salimans 2022).

  The conditional and unconditional passes run as one call on a doubled batch, which keeps an
  accelerator busy at small batch sizes; or as two calls on the batch (`separate_passes`), which
  XLA:CPU runs side by side on its cores. None chooses two calls on CPU from
  SEPARATE_PASSES_MIN_BATCH images per pass, one doubled call otherwise: on a 2-core Xeon
  (cpu_small, 10 guided DDIM steps) two calls took 1.51 against 1.65 s per image at batch 8 and
  1.78 against 1.72 s at batch 1. Both give the same images up to float rounding.

  Args:
    model_fn: (x [B, ...], t [B], context) -> output [B, ...].
    cond: conditioning context for the batch (array or pytree of arrays with
      leading batch axis B), e.g. text embeddings.
    uncond: the "empty prompt" context, same structure and shapes as cond.
    scale: guidance scale w; 1 reproduces the conditional model.
    separate_passes: two model calls per step instead of one on a doubled batch; None decides
      by platform and batch size (above). A model_fn that needs both halves in one call
      (ControlNet residuals) passes False.

  Returns:
    denoise_fn(x_t, t) = uncond_out + scale * (cond_out - uncond_out).
  """
  context = jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)

  def denoise_fn(x_t: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    separate = separate_passes
    if separate is None:
      separate = jax.default_backend() == "cpu" and x_t.shape[0] >= SEPARATE_PASSES_MIN_BATCH
    if separate:
      out_uncond, out_cond = model_fn(x_t, t, uncond), model_fn(x_t, t, cond)
    else:
      out = model_fn(jnp.concatenate([x_t, x_t], axis=0), jnp.concatenate([t, t], axis=0),
                     context)
      out_uncond, out_cond = jnp.split(out, 2, axis=0)
    return out_uncond + scale * (out_cond - out_uncond)

  return denoise_fn
