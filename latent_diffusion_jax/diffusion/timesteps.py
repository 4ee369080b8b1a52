"""Inference timestep selection, matching diffusers' `set_timesteps`.

diffusers computes these on the host with numpy and each scheduler class has
its own formula; the same float arithmetic is reproduced here so a given
(num_steps, spacing, offset) visits exactly the timesteps diffusers visits.
Timesteps are static: they become constants of the compiled sampling loop.
"""

from __future__ import annotations

import numpy as np
from latent_diffusion_jax.core.errors import UserInputError

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _check_args(num_train_timesteps: int, num_steps: int, timestep_spacing: str) -> None:
  if timestep_spacing not in TIMESTEP_SPACINGS:
    raise UserInputError(
        f"Unknown timestep_spacing {timestep_spacing!r}; valid ones are {TIMESTEP_SPACINGS}.")
  if not 1 <= num_steps <= num_train_timesteps:
    raise UserInputError(
        f"num_steps must be in [1, {num_train_timesteps}] (the number of training "
        f"timesteps), got {num_steps}.")


def ddim_timesteps(num_train_timesteps: int, num_steps: int,
                   timestep_spacing: str = "leading", steps_offset: int = 0) -> np.ndarray:
  """Descending timesteps of diffusers' DDPMScheduler / DDIMScheduler.

  Args:
    num_train_timesteps: number of training timesteps T.
    num_steps: number of sampling steps.
    timestep_spacing: "leading" (SD 1.x/2.x), "trailing" (zero-terminal-SNR
      models) or "linspace".
    steps_offset: added to "leading" timesteps (SD uses 1); ignored otherwise,
      as in diffusers.

  Returns:
    int64 array of descending timesteps. Its length is usually num_steps;
    "trailing" with a non-integer ratio T / num_steps can give one more, as in
    diffusers.
  """
  _check_args(num_train_timesteps, num_steps, timestep_spacing)
  if timestep_spacing == "linspace":
    ts = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1]
  elif timestep_spacing == "leading":
    ratio = num_train_timesteps // num_steps
    ts = (np.arange(0, num_steps) * ratio).round()[::-1] + steps_offset
  else:
    ratio = num_train_timesteps / num_steps
    ts = np.round(np.arange(num_train_timesteps, 0, -ratio)) - 1
  return _checked(ts, num_train_timesteps)


def dpm_solver_timesteps(num_train_timesteps: int, num_steps: int,
                         timestep_spacing: str = "linspace",
                         steps_offset: int = 0) -> np.ndarray:
  """Descending timesteps of diffusers' DPMSolverMultistepScheduler.

  Unlike DDIM, "linspace" and "leading" split [0, T) into num_steps + 1
  points and drop the last, so the final solver step lands on sigma = 0
  rather than on timestep 0. (lambda_min_clipped is not supported: it is -inf
  by default in diffusers, which keeps the whole range.)

  Args:
    num_train_timesteps: number of training timesteps T.
    num_steps: number of solver steps.
    timestep_spacing: "linspace" (diffusers' default), "leading" or
      "trailing".
    steps_offset: added to "leading" timesteps; ignored otherwise.

  Returns:
    int64 array of descending timesteps.
  """
  _check_args(num_train_timesteps, num_steps, timestep_spacing)
  last = num_train_timesteps
  if timestep_spacing == "linspace":
    ts = np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1]
  elif timestep_spacing == "leading":
    ratio = last // (num_steps + 1)
    ts = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1] + steps_offset
  else:
    ratio = num_train_timesteps / num_steps
    ts = np.arange(last, 0, -ratio).round() - 1
  return _checked(ts, num_train_timesteps)


def _checked(ts: np.ndarray, num_train_timesteps: int) -> np.ndarray:
  ts = ts.astype(np.int64)
  # A large steps_offset can push "leading" timesteps past the table, where
  # a jnp gather would silently clamp instead of failing.
  if ts.max() >= num_train_timesteps:
    raise UserInputError(
        f"Timestep {ts.max()} is out of range for {num_train_timesteps} training timesteps; "
        "lower steps_offset.")
  return ts


def ddpm_previous_timesteps(timesteps: np.ndarray) -> np.ndarray:
  """DDPMScheduler's "previous" timesteps: the next entry, -1 after the last."""
  return np.concatenate([timesteps[1:], [-1]]).astype(np.int64)


def ddim_previous_timesteps(timesteps: np.ndarray, num_train_timesteps: int,
                            num_steps: int) -> np.ndarray:
  """DDIMScheduler's "previous" timesteps: t - T // num_steps.

  This is a fixed stride, not the next entry of `timesteps`; with "linspace"
  or "trailing" spacing the two differ, and diffusers uses the stride.
  """
  return (timesteps - num_train_timesteps // num_steps).astype(np.int64)
