"""Tests for diffusion/schedules.py: tables and forward process vs diffusers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion_jax.diffusion import schedules

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012)


def _diffusers_ddpm(kind, rescale=False):
  from diffusers import DDPMScheduler  # pylint: disable=import-outside-toplevel
  name = "squaredcos_cap_v2" if kind == "cosine" else kind
  return DDPMScheduler(num_train_timesteps=1000, beta_schedule=name,
                       rescale_betas_zero_snr=rescale, **SD_BETAS)


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("rescale", [False, True])
def test_tables_match_diffusers(kind, rescale):
  ours = schedules.make_schedule(kind, 1000, rescale_zero_terminal_snr=rescale, **SD_BETAS)
  ref = _diffusers_ddpm(kind, rescale)
  assert ours.betas.dtype == jnp.float32 and ours.alphas_cumprod.dtype == jnp.float32
  assert ours.num_timesteps == 1000
  # diffusers rescales in float32, where 1 - acp[t] / acp[t-1] loses up to
  # ~1e-5 absolute on the large terminal betas; we compute in float64.
  betas_atol = 1e-5 if rescale else 1e-6
  np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=0, atol=betas_atol)
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
  if rescale:
    assert float(ours.alphas_cumprod[-1]) == 0.0


def test_squaredcos_alias_and_cosine_ignores_beta_range():
  a = schedules.make_schedule("cosine", 100)
  b = schedules.make_schedule("squaredcos_cap_v2", 100, beta_start=0.5, beta_end=0.6)
  np.testing.assert_array_equal(a.betas, b.betas)
  assert float(a.betas.max()) == pytest.approx(0.999)


@pytest.mark.parametrize("kind", ["quadratic", "Linear", ""])
def test_unknown_kind_names_valid_ones(kind):
  with pytest.raises(ValueError, match="scaled_linear"):
    schedules.make_schedule(kind)


@pytest.mark.parametrize("num_timesteps", [0, 1, -5, 10.0, True])
def test_bad_num_timesteps(num_timesteps):
  with pytest.raises(ValueError, match="num_timesteps"):
    schedules.make_schedule("linear", num_timesteps)


@pytest.mark.parity
def test_add_noise_and_velocity_match_diffusers():
  import torch  # pylint: disable=import-outside-toplevel
  ours = schedules.make_schedule("scaled_linear", **SD_BETAS)
  ref = _diffusers_ddpm("scaled_linear")
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  x0 = jax.random.normal(k1, (4, 8, 8, 4))
  noise = jax.random.normal(k2, (4, 8, 8, 4))
  t = jnp.array([0, 1, 500, 999], jnp.int32)
  x0_t, noise_t, t_t = (torch.from_numpy(np.array(a)) for a in (x0, noise, t))
  np.testing.assert_allclose(schedules.add_noise(ours, x0, noise, t),
                             ref.add_noise(x0_t, noise_t, t_t.long()).numpy(), rtol=0, atol=1e-6)
  np.testing.assert_allclose(schedules.velocity(ours, x0, noise, t),
                             ref.get_velocity(x0_t, noise_t, t_t.long()).numpy(), rtol=0, atol=1e-6)


def test_add_noise_broadcasts_per_example_and_jits():
  sched = schedules.make_schedule("linear", 10)
  x0 = jnp.ones((3, 2, 2, 1))
  noise = jnp.zeros((3, 2, 2, 1))
  t = jnp.array([0, 5, 9])
  out = jax.jit(schedules.add_noise)(sched, x0, noise, t)
  expected = jnp.sqrt(sched.alphas_cumprod[t])
  np.testing.assert_allclose(out[:, 0, 0, 0], expected, rtol=1e-6)
  assert (out == out[:, :1, :1, :1]).all()


def test_snr_monotone_and_zero_at_terminal():
  sched = schedules.make_schedule("scaled_linear", rescale_zero_terminal_snr=True, **SD_BETAS)
  s = schedules.snr(sched, jnp.arange(1000))
  assert (jnp.diff(s) < 0).all()
  assert float(s[-1]) == 0.0
  acp = sched.alphas_cumprod[10]
  np.testing.assert_allclose(s[10], acp / (1 - acp), rtol=1e-6)
