"""Tests for diffusion/objectives.py: targets, x0/eps recovery, weights, loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion_jax.diffusion import objectives
from latent_diffusion_jax.diffusion import schedules

SCHED = schedules.make_schedule("scaled_linear", 1000)


def _batch(seed=0, shape=(4, 8, 8, 4)):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return jax.random.normal(k1, shape), jax.random.normal(k2, shape)


def test_prediction_targets():
  x0, noise = _batch()
  t = jnp.array([0, 10, 500, 999])
  np.testing.assert_array_equal(objectives.prediction_target("epsilon", SCHED, x0, noise, t), noise)
  np.testing.assert_array_equal(objectives.prediction_target("sample", SCHED, x0, noise, t), x0)
  acp = SCHED.alphas_cumprod[t][:, None, None, None]
  np.testing.assert_allclose(objectives.prediction_target("v_prediction", SCHED, x0, noise, t),
                             jnp.sqrt(acp) * noise - jnp.sqrt(1 - acp) * x0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("prediction_type", objectives.PREDICTION_TYPES)
def test_x0_eps_round_trip(prediction_type):
  x0, noise = _batch(1)
  # Avoid t = 0 for "sample": eps = (x_t - alpha x0) / sigma divides by a tiny sigma.
  t = jnp.array([20, 200, 600, 999])
  x_t = schedules.add_noise(SCHED, x0, noise, t)
  target = objectives.prediction_target(prediction_type, SCHED, x0, noise, t)
  x0_hat, eps_hat = objectives.model_output_to_x0_eps(prediction_type, SCHED, x_t, t, target)
  np.testing.assert_allclose(x0_hat, x0, rtol=0, atol=2e-5)
  np.testing.assert_allclose(eps_hat, noise, rtol=0, atol=2e-5)


def test_unknown_prediction_type():
  x0, noise = _batch()
  with pytest.raises(ValueError, match="v_prediction"):
    objectives.prediction_target("x0", SCHED, x0, noise, jnp.zeros(4, jnp.int32))


@pytest.mark.parametrize("prediction_type,expected", [
    ("epsilon", lambda s, g: np.minimum(s, g) / s),
    ("v_prediction", lambda s, g: np.minimum(s, g) / (s + 1)),
    ("sample", lambda s, g: np.minimum(s, g)),
])
def test_min_snr_weights(prediction_type, expected):
  t = jnp.array([0, 50, 300, 700, 999])
  acp = np.asarray(SCHED.alphas_cumprod, np.float64)[np.asarray(t)]
  snr = acp / (1 - acp)
  w = objectives.loss_weights("min_snr", prediction_type, SCHED, t, snr_gamma=5.0)
  np.testing.assert_allclose(w, expected(snr, 5.0), rtol=1e-5)
  np.testing.assert_array_equal(objectives.loss_weights("uniform", prediction_type, SCHED, t),
                                np.ones(5, np.float32))


def test_min_snr_epsilon_finite_at_zero_terminal_snr():
  sched = schedules.make_schedule("scaled_linear", rescale_zero_terminal_snr=True)
  w = objectives.loss_weights("min_snr", "epsilon", sched, jnp.array([998, 999]))
  assert np.isfinite(w).all() and float(w[1]) == 1.0


def test_unknown_weighting():
  with pytest.raises(ValueError, match="min_snr"):
    objectives.loss_weights("p2", "epsilon", SCHED, jnp.zeros(2, jnp.int32))


def test_offset_noise_shape_and_statistics():
  shape = (64, 16, 16, 4)
  rng = jax.random.PRNGKey(3)
  plain = objectives.sample_noise(rng, shape)
  offset = objectives.sample_noise(rng, shape, offset_noise=0.5)
  assert plain.shape == offset.shape == shape and plain.dtype == jnp.float32
  plain, offset = np.asarray(plain, np.float64), np.asarray(offset, np.float64)
  assert abs(plain.std() - 1.0) < 0.02
  # The offset is constant over H, W, so it shows up as per-(b, c) means with
  # variance 1 / (H*W) + 0.5**2 instead of 1 / (H*W).
  assert abs(offset.mean(axis=(1, 2)).var() - (1 / 256 + 0.25)) < 0.06
  assert plain.mean(axis=(1, 2)).var() < 0.01
  assert abs(offset.var() - 1.25) < 0.1
  assert objectives.sample_noise(rng, shape, dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_diffusion_loss_per_example():
  out = jnp.zeros((3, 2, 2, 1))
  target = jnp.arange(3.0)[:, None, None, None] * jnp.ones((3, 2, 2, 1))
  np.testing.assert_allclose(objectives.diffusion_loss(out, target), [0.0, 1.0, 4.0])
  np.testing.assert_allclose(objectives.diffusion_loss(out, target, jnp.array([1.0, 2.0, 0.5])),
                             [0.0, 2.0, 2.0])


def test_loss_per_timestep_bucket_jitted():
  loss = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0])
  t = jnp.array([0, 99, 100, 950, 999])
  fn = jax.jit(objectives.loss_per_timestep_bucket, static_argnums=(2, 3))
  sums, counts = fn(loss, t, 1000, 10)
  expected_sums = np.zeros(10)
  expected_sums[[0, 1, 9]] = [3.0, 3.0, 9.0]
  expected_counts = np.zeros(10)
  expected_counts[[0, 1, 9]] = [2, 1, 2]
  np.testing.assert_array_equal(sums, expected_sums)
  np.testing.assert_array_equal(counts, expected_counts)
