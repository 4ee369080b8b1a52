"""Discrete-time noise schedules and the forward (noising) process.

The conventions follow diffusers' DDPM-family schedulers so that checkpoints
trained with either code base see the same noise levels: `alphas_cumprod[t]`
is the signal fraction at integer timestep `t` in `[0, T)`.
"""

from __future__ import annotations

import math

import flax.struct
import jax.numpy as jnp
import numpy as np
from latent_diffusion_jax.core.errors import UserInputError

SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine")
# diffusers' name for the cosine schedule; accepted so configs can be shared.
_KIND_ALIASES = {"squaredcos_cap_v2": "cosine"}


@flax.struct.dataclass
class NoiseSchedule:
  """Per-timestep noise levels of a discrete diffusion process.

  Attributes:
    betas: float32 [T], per-step noise variances.
    alphas_cumprod: float32 [T], cumulative product of (1 - betas); the
      signal variance of x_t given x_0.
  """

  betas: jnp.ndarray
  alphas_cumprod: jnp.ndarray

  @property
  def num_timesteps(self) -> int:
    """Number of training timesteps T (static: taken from the array shape)."""
    return self.betas.shape[0]

  @property
  def alphas(self) -> jnp.ndarray:
    """Per-step signal fractions 1 - betas."""
    return 1.0 - self.betas


def _cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal (2021) cosine schedule, discretised as in their code."""

  def alpha_bar(s):
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

  return np.array([
      min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
      for i in range(num_timesteps)
  ], dtype=np.float64)


def zero_terminal_snr_betas(betas: np.ndarray) -> np.ndarray:
  """Rescales betas so that the last timestep has exactly zero SNR.

  Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
  Flawed", Algorithm 1: shift sqrt(alphas_cumprod) so its last entry is 0 and
  rescale it so its first entry is unchanged.

  Args:
    betas: [T] betas, any float dtype.

  Returns:
    [T] float64 rescaled betas; the last one is exactly 1.
  """
  sqrt_acp = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
  first, last = sqrt_acp[0], sqrt_acp[-1]
  sqrt_acp = (sqrt_acp - last) * (first / (first - last))
  acp = sqrt_acp**2
  alphas = np.concatenate([acp[:1], acp[1:] / acp[:-1]])
  return 1.0 - alphas


def make_schedule(
    kind: str,
    num_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    rescale_zero_terminal_snr: bool = False,
) -> NoiseSchedule:
  """Builds a noise schedule.

  The arithmetic runs in float64 on the host and is rounded to float32 once,
  which keeps the result within float32 rounding of diffusers' tables.

  Args:
    kind: "linear" (betas linear in t), "scaled_linear" (Stable Diffusion:
      sqrt(betas) linear in t) or "cosine" (Nichol & Dhariwal; diffusers'
      "squaredcos_cap_v2" is accepted as an alias). beta_start/beta_end are
      ignored for "cosine".
    num_timesteps: number of training timesteps T, at least 2.
    beta_start: first beta of the linear schedules.
    beta_end: last beta of the linear schedules.
    rescale_zero_terminal_snr: apply the Lin et al. 2023 rescale so that
      alphas_cumprod[T-1] == 0 (pair with v-prediction and "trailing" spacing).

  Returns:
    A NoiseSchedule with float32 arrays of length T.

  Raises:
    ValueError: for an unknown kind or a bad num_timesteps.
  """
  canonical = _KIND_ALIASES.get(kind, kind)
  if canonical not in SCHEDULE_KINDS:
    raise UserInputError(
        f"Unknown noise schedule kind {kind!r}; valid kinds are {SCHEDULE_KINDS} "
        f"(or the alias 'squaredcos_cap_v2' for 'cosine').")
  if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)):
    raise UserInputError(f"num_timesteps must be an int, got {num_timesteps!r}.")
  if num_timesteps < 2:
    raise UserInputError(f"num_timesteps must be at least 2, got {num_timesteps}.")

  if canonical == "linear":
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  elif canonical == "scaled_linear":
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64)**2
  else:
    betas = _cosine_betas(num_timesteps)
  if rescale_zero_terminal_snr:
    betas = zero_terminal_snr_betas(betas)
  alphas_cumprod = np.cumprod(1.0 - betas)
  return NoiseSchedule(
      betas=jnp.asarray(betas, jnp.float32),
      alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32))


def gather_per_example(values: jnp.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
  """Gathers per-timestep values for a batch, shaped to broadcast over x.

  Args:
    values: [T] per-timestep table (e.g. alphas_cumprod).
    t: int timesteps [B].
    ndim: rank of the tensor the result will multiply.

  Returns:
    values[t] reshaped to [B, 1, ..., 1] with ndim axes.
  """
  return values[t].reshape((-1,) + (1,) * (ndim - 1))


def add_noise(schedule: NoiseSchedule, x0: jnp.ndarray, noise: jnp.ndarray,
              t: jnp.ndarray) -> jnp.ndarray:
  """Samples x_t ~ q(x_t | x_0) with the given noise.

  Args:
    schedule: the noise schedule.
    x0: clean samples [B, ...] (e.g. NHWC latents).
    noise: standard normal noise, same shape as x0.
    t: int timesteps [B].

  Returns:
    sqrt(acp_t) * x0 + sqrt(1 - acp_t) * noise, same shape and dtype as x0.
  """
  acp = gather_per_example(schedule.alphas_cumprod, t, x0.ndim)
  out = jnp.sqrt(acp) * x0 + jnp.sqrt(1.0 - acp) * noise
  return out.astype(x0.dtype)


def velocity(schedule: NoiseSchedule, x0: jnp.ndarray, noise: jnp.ndarray,
             t: jnp.ndarray) -> jnp.ndarray:
  """The v-prediction target of Salimans & Ho 2022.

  Args:
    schedule: the noise schedule.
    x0: clean samples [B, ...].
    noise: the noise used to build x_t, same shape as x0.
    t: int timesteps [B].

  Returns:
    v = sqrt(acp_t) * noise - sqrt(1 - acp_t) * x0, same shape and dtype as x0.
  """
  acp = gather_per_example(schedule.alphas_cumprod, t, x0.ndim)
  out = jnp.sqrt(acp) * noise - jnp.sqrt(1.0 - acp) * x0
  return out.astype(x0.dtype)


def snr(schedule: NoiseSchedule, t: jnp.ndarray) -> jnp.ndarray:
  """Signal-to-noise ratio acp_t / (1 - acp_t) at int timesteps t.

  Args:
    schedule: the noise schedule.
    t: int timesteps, any shape.

  Returns:
    float32 SNR with the shape of t (0 at a zero-terminal-SNR final step).
  """
  acp = schedule.alphas_cumprod[t]
  return acp / (1.0 - acp)
