"""The typed description of a model's diffusion process, shared by training, sampling and export.

A `DiffusionSpec` travels in every model bundle: the trainer makes it from `config.diffusion`,
loaders read it from checkpoints, diffusers scheduler configs, single-file yamls and native
exports, the sampler builds its noise schedule from it, and the exporters write it back.
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional

from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.diffusion import schedules
from latent_diffusion_jax.diffusion.objectives import PREDICTION_TYPES

# Sampling-time settings a source may pin (diffusers' scheduler configs do); None means the
# sampler's Stable Diffusion defaults.
SCHEDULER_OVERRIDES = ("timestep_spacing", "steps_offset", "set_alpha_to_one")


@dataclasses.dataclass(frozen=True)
class DiffusionSpec:
  """The training noise schedule and prediction target of a model.

  Attributes:
    schedule, num_timesteps, beta_start, beta_end, rescale_zero_terminal_snr: the noise schedule
      (see `schedules.make_schedule`).
    prediction_type: what the network predicts: "epsilon", "v_prediction" or "sample".
    timestep_spacing, steps_offset, set_alpha_to_one: sampling-time schedule settings the source
      pins, or None for Stable Diffusion's (see `sampling.make_sample_fn`).
  """
  schedule: str = "scaled_linear"
  num_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  rescale_zero_terminal_snr: bool = False
  prediction_type: str = "epsilon"
  timestep_spacing: Optional[str] = None
  steps_offset: Optional[int] = None
  set_alpha_to_one: Optional[bool] = None

  def __post_init__(self):
    if self.prediction_type not in PREDICTION_TYPES:
      raise UserInputError(f"Unknown prediction_type {self.prediction_type!r}; valid: "
                           f"{', '.join(PREDICTION_TYPES)}.")
    if self.schedule not in schedules.SCHEDULE_KINDS:
      raise UserInputError(f"Unknown noise schedule {self.schedule!r}; valid: "
                           f"{', '.join(schedules.SCHEDULE_KINDS)}.")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "DiffusionSpec":
    """From a mapping of these fields (as `to_dict` writes it); unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise UserInputError(f"Unknown diffusion settings {unknown}; valid: {sorted(names)}.")
    return cls(**values)

  @classmethod
  def from_config(cls, diffusion_config: Mapping[str, Any]) -> "DiffusionSpec":
    """From a run's `config.diffusion` (its training-only keys, such as loss_weighting, are not
    part of the model's description)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = (diffusion_config.to_dict() if hasattr(diffusion_config, "to_dict")
              else dict(diffusion_config))
    return cls(**{k: v for k, v in values.items() if k in names})

  def to_dict(self) -> Dict[str, Any]:
    """The fields as plain JSON values; unset sampling overrides are left out."""
    out = dataclasses.asdict(self)
    for key in SCHEDULER_OVERRIDES:
      if out[key] is None:
        del out[key]
    return out

  def noise_schedule(self) -> schedules.NoiseSchedule:
    return schedules.make_schedule(self.schedule, self.num_timesteps, self.beta_start,
                                   self.beta_end, self.rescale_zero_terminal_snr)

  def scheduler_overrides(self) -> Dict[str, Any]:
    """The sampling-time settings this spec pins (name -> value)."""
    return {k: getattr(self, k) for k in SCHEDULER_OVERRIDES if getattr(self, k) is not None}
