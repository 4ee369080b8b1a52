"""samplers.sample's image-conditioning options against diffusers' schedulers: starting part-way
(img2img strength), the re-noising inpainting hook, and dynamic thresholding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.diffusion import samplers
from latent_diffusion_jax.diffusion import schedules

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SHAPE = (2, 8, 8, 4)
TOL = dict(rtol=1e-5, atol=1e-5)
SD = dict(beta_start=0.00085, beta_end=0.012)


def _fake_model_jax(x, t):
  t = t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  return 0.1 * x + 0.05 * jnp.sin(t / 100.0)


def _fake_model_torch(x, t):
  import torch
  return 0.1 * x + 0.05 * torch.sin(torch.as_tensor(t).float() / 100.0)


def _schedule():
  return schedules.make_schedule("scaled_linear", 1000, **SD)


def _scheduler(name, **kw):
  import diffusers
  return getattr(diffusers, name)(num_train_timesteps=1000, beta_schedule="scaled_linear", **SD,
                                  **kw)


def _normal(seed, shape=SHAPE, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


@pytest.mark.parity
@pytest.mark.parametrize("name,sampler,kw", [
    ("DDIMScheduler", "ddim", dict(set_alpha_to_one=False, steps_offset=1, clip_sample=False,
                                   timestep_spacing="leading")),
    ("DPMSolverMultistepScheduler", "dpmpp_2m", dict(steps_offset=1)),
])
@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_strength_matches_diffusers_img2img_loop(name, sampler, kw, strength):
  """The StableDiffusionImg2ImgPipeline loop: get_timesteps, add_noise at the first kept
  timestep, set_begin_index."""
  import torch
  num_steps = 10
  x0, noise = _normal(0, scale=2.0), _normal(1)
  sched = _scheduler(name, **kw)
  sched.set_timesteps(num_steps)
  init = min(int(num_steps * strength), num_steps)
  t_start = num_steps - init
  timesteps = sched.timesteps[t_start:]
  if hasattr(sched, "set_begin_index"):
    sched.set_begin_index(t_start)
  x = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), timesteps[:1])
  for t in timesteps:
    x = sched.step(_fake_model_torch(x, t), t, x).prev_sample
  ref = x.numpy()

  start = samplers.start_step_for_strength(num_steps, strength)
  assert start == t_start
  spacing = kw.get("timestep_spacing")
  ts = samplers.sampler_timesteps(1000, sampler, num_steps, spacing, 1)
  np.testing.assert_array_equal(ts[start:], timesteps.numpy())
  schedule = _schedule()
  x_start = schedules.add_noise(schedule, jnp.asarray(x0), jnp.asarray(noise),
                                jnp.full((2,), ts[start], jnp.int32))
  ours = samplers.sample(_fake_model_jax, schedule, x_start, sampler=sampler, num_steps=num_steps,
                         timestep_spacing=spacing, steps_offset=1, set_alpha_to_one=False,
                         start_step=start)
  np.testing.assert_allclose(np.asarray(ours), ref, **TOL)


@pytest.mark.parity
@pytest.mark.parametrize("name,sampler", [("DDIMScheduler", "ddim"),
                                          ("DPMSolverMultistepScheduler", "dpmpp_2m")])
def test_renoise_hook_matches_diffusers_inpaint_loop(name, sampler):
  """StableDiffusionInpaintPipeline's loop for a 4-channel UNet: after each step the kept region
  is the image latents noised to the next timestep (clean after the last step)."""
  import torch
  num_steps = 6
  known, noise = _normal(2, scale=2.0), _normal(3)
  mask = np.zeros((2, 8, 8, 1), np.float32)
  mask[:, 2:6, 1:5] = 1.0  # 1 = repaint
  kw = dict(set_alpha_to_one=False, clip_sample=False) if sampler == "ddim" else {}
  sched = _scheduler(name, steps_offset=1, **kw)
  sched.set_timesteps(num_steps)
  ts = sched.timesteps
  m, k, n = (torch.from_numpy(a) for a in (mask, known, noise))
  x = n.clone()
  for i, t in enumerate(ts):
    x = sched.step(_fake_model_torch(x, t), t, x).prev_sample
    proper = k if i == len(ts) - 1 else sched.add_noise(k, n, torch.tensor([ts[i + 1]]))
    x = (1 - m) * proper + m * x
  ref = x.numpy()

  schedule = _schedule()
  hook = samplers.renoise_known_region(schedule, jnp.asarray(known), jnp.asarray(1.0 - mask),
                                       jnp.asarray(noise))
  ours = jax.jit(lambda x_T: samplers.sample(
      _fake_model_jax, schedule, x_T, sampler=sampler, num_steps=num_steps, steps_offset=1,
      set_alpha_to_one=False, step_hook=hook))(jnp.asarray(noise))
  np.testing.assert_allclose(np.asarray(ours), ref, **TOL)
  # The kept region ends exactly on the known content.
  np.testing.assert_allclose(np.asarray(ours) * (1 - mask), known * (1 - mask), atol=1e-6)


@pytest.mark.parity
@pytest.mark.parametrize("name,sampler", [("DDIMScheduler", "ddim"), ("DDPMScheduler", "ddpm"),
                                          ("DPMSolverMultistepScheduler", "dpmpp_2m")])
def test_dynamic_thresholding_matches_diffusers(name, sampler):
  import torch
  num_steps = 5
  # A "pixel-space" model whose x0 prediction overshoots [-1, 1].
  x_T = _normal(4, scale=1.0)
  def model_t(x, t):
    return 0.5 * x - 0.3 * torch.sin(torch.as_tensor(t).float() / 50.0)
  def model_j(x, t):
    t = t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    return 0.5 * x - 0.3 * jnp.sin(t / 50.0)
  kw = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
  if sampler == "dpmpp_2m":
    kw["algorithm_type"] = "dpmsolver++"
  sched = _scheduler(name, **kw)
  sched.set_timesteps(num_steps)
  x = torch.from_numpy(x_T)
  if sampler == "ddpm":
    # DDPM adds noise at every step but the last: compare one deterministic final step.
    t = sched.timesteps[-1]
    ref = sched.step(model_t(x, t), t, x).prev_sample.numpy()
    out = samplers.ddpm_step(_schedule(), model_j(jnp.asarray(x_T), jnp.full((2,), t.item())),
                             jnp.asarray(x_T), t.item(), -1, jnp.zeros(SHAPE),
                             x0_fn=lambda x0: samplers.dynamic_threshold(x0, 0.9, 1.5))
    np.testing.assert_allclose(np.asarray(out), ref, **TOL)
    return
  for t in sched.timesteps:
    x = sched.step(model_t(x, t), t, x).prev_sample
  ours = samplers.sample(model_j, _schedule(), jnp.asarray(x_T), sampler=sampler,
                         num_steps=num_steps, dynamic_threshold_percentile=0.9,
                         sample_max_value=1.5)
  plain = samplers.sample(model_j, _schedule(), jnp.asarray(x_T), sampler=sampler,
                          num_steps=num_steps)
  np.testing.assert_allclose(np.asarray(ours), x.numpy(), **TOL)
  assert np.abs(np.asarray(plain) - np.asarray(ours)).max() > 1e-2  # thresholding did something


def test_dynamic_threshold_bounds_and_identity():
  x0 = jnp.asarray(_normal(5, scale=3.0))
  out = samplers.dynamic_threshold(x0, 0.995, 2.0)
  assert float(jnp.abs(out).max()) <= 1.0 + 1e-6
  inside = jnp.asarray(_normal(6, scale=0.2))  # already in [-1, 1]: s = 1, unchanged
  np.testing.assert_allclose(np.asarray(samplers.dynamic_threshold(inside, 0.995)),
                             np.asarray(inside), atol=0)


def test_strength_and_start_step_errors():
  for bad in (0.0, -0.1, 1.5, float("nan")):
    with pytest.raises(UserInputError, match="strength"):
      samplers.start_step_for_strength(10, bad)
  with pytest.raises(UserInputError, match="no denoising step"):
    samplers.start_step_for_strength(10, 0.05)
  assert samplers.start_step_for_strength(10, 1.0) == 0
  with pytest.raises(UserInputError, match="start_step"):
    samplers.sample(_fake_model_jax, _schedule(), jnp.zeros(SHAPE), num_steps=4, start_step=4)
  with pytest.raises(UserInputError, match="dynamic_threshold_percentile"):
    samplers.sample(_fake_model_jax, _schedule(), jnp.zeros(SHAPE), num_steps=4,
                    dynamic_threshold_percentile=1.5)
