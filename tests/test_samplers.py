"""Tests for diffusion/samplers.py and timesteps.py, mostly parity with diffusers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion_jax.diffusion import samplers
from latent_diffusion_jax.diffusion import schedules
from latent_diffusion_jax.diffusion import timesteps as timesteps_lib

# Raised inside diffusers' DPMSolverMultistepScheduler.set_timesteps (torch -> numpy), not by us.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012)
SHAPE = (2, 8, 8, 4)
# Trajectory tolerance: 20 float32 steps, values of order 1-10.
TRAJ_TOL = dict(rtol=1e-5, atol=1e-5)


def _fake_model_jax(x, t):
  """An analytic stand-in for a UNet: depends on both x and t."""
  t = t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  return 0.1 * x + 0.05 * jnp.sin(t / 100.0)


def _fake_model_torch(x, t):
  import torch  # pylint: disable=import-outside-toplevel
  return 0.1 * x + 0.05 * torch.sin(t.float() / 100.0)


def _x_T(seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), SHAPE, jnp.float32)


def _torch(a):
  import torch  # pylint: disable=import-outside-toplevel
  return torch.from_numpy(np.array(a))


def _diffusers(cls_name, **kwargs):
  import diffusers  # pylint: disable=import-outside-toplevel
  return getattr(diffusers, cls_name)(num_train_timesteps=1000, **kwargs)


def _diffusers_trajectory(scheduler, x_T, num_steps, **step_kwargs):
  scheduler.set_timesteps(num_steps)
  x = _torch(x_T)
  for t in scheduler.timesteps:
    x = scheduler.step(_fake_model_torch(x, t), t, x, **step_kwargs).prev_sample
  return x.numpy()


# ----------------------------------------------------------------- timesteps


@pytest.mark.parity
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [1, 3, 7, 20, 50])
def test_timesteps_match_diffusers(spacing, num_steps):
  for cls_name in ("DDIMScheduler", "DDPMScheduler"):
    ref = _diffusers(cls_name, timestep_spacing=spacing, steps_offset=1)
    ref.set_timesteps(num_steps)
    ours = timesteps_lib.ddim_timesteps(1000, num_steps, spacing, steps_offset=1)
    np.testing.assert_array_equal(ours, ref.timesteps.numpy(), err_msg=cls_name)
  ref = _diffusers("DPMSolverMultistepScheduler", timestep_spacing=spacing, steps_offset=1)
  ref.set_timesteps(num_steps)
  ours = timesteps_lib.dpm_solver_timesteps(1000, num_steps, spacing, steps_offset=1)
  np.testing.assert_array_equal(ours, ref.timesteps.numpy())


def test_timestep_errors():
  with pytest.raises(ValueError, match="leading"):
    timesteps_lib.ddim_timesteps(1000, 10, "uniform")
  with pytest.raises(ValueError, match="num_steps"):
    timesteps_lib.dpm_solver_timesteps(1000, 1001)
  with pytest.raises(ValueError, match="steps_offset"):
    timesteps_lib.ddim_timesteps(1000, 10, "leading", steps_offset=100)


# ------------------------------------------------------------- single steps


@pytest.mark.parity
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip_sample", [False, True])
def test_ddpm_step_matches_diffusers(prediction_type, clip_sample):
  import torch  # pylint: disable=import-outside-toplevel
  sched = schedules.make_schedule("scaled_linear", **SD_BETAS)
  ref = _diffusers("DDPMScheduler", beta_schedule="scaled_linear", prediction_type=prediction_type,
                   clip_sample=clip_sample, **SD_BETAS)
  ref.set_timesteps(10)
  ts = ref.timesteps.numpy()
  prev_ts = timesteps_lib.ddpm_previous_timesteps(ts)
  step = jax.jit(samplers.ddpm_step, static_argnames=("prediction_type", "clip_sample"))
  x = _x_T(1)
  for t, prev_t in [(ts[0], prev_ts[0]), (ts[5], prev_ts[5]), (ts[-1], prev_ts[-1])]:
    output = _fake_model_jax(x, jnp.full((2,), t))
    # DDPMScheduler.step has no variance_noise argument; it draws
    # torch.randn(shape, generator) itself, so draw the same numbers here.
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(int(t)))
    expected = ref.step(_torch(output), int(t), _torch(x),
                        generator=torch.Generator().manual_seed(int(t))).prev_sample
    ours = step(sched, output, x, t, prev_t, jnp.asarray(noise.numpy()),
                              prediction_type=prediction_type, clip_sample=clip_sample)
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6, atol=1e-6, err_msg=f"t={t}")


@pytest.mark.parity
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_matches_diffusers(eta, prediction_type):
  sched = schedules.make_schedule("scaled_linear", **SD_BETAS)
  ref = _diffusers("DDIMScheduler", beta_schedule="scaled_linear", clip_sample=False,
                   set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
                   **SD_BETAS)
  ref.set_timesteps(20)
  ts = ref.timesteps.numpy()
  prev_ts = timesteps_lib.ddim_previous_timesteps(ts, 1000, 20)
  x = _x_T(2)
  noise = jax.random.normal(jax.random.PRNGKey(7), SHAPE)
  for i in (0, 10, 19):
    output = _fake_model_jax(x, jnp.full((2,), ts[i]))
    expected = ref.step(_torch(output), int(ts[i]), _torch(x), eta=eta,
                        variance_noise=_torch(noise)).prev_sample
    ours = samplers.ddim_step(sched, output, x, ts[i], prev_ts[i], noise, eta=eta,
                              prediction_type=prediction_type, set_alpha_to_one=False)
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6, atol=1e-6, err_msg=f"i={i}")


# ------------------------------------------------------------- trajectories


@pytest.mark.parity
@pytest.mark.parametrize("prediction_type,kind,spacing,rescale", [
    ("epsilon", "scaled_linear", "leading", False),  # Stable Diffusion 1.x
    ("v_prediction", "scaled_linear", "leading", False),  # SD 2.x 768-v
    ("v_prediction", "scaled_linear", "trailing", True),  # zero terminal SNR
])
def test_ddim_trajectory_matches_diffusers(prediction_type, kind, spacing, rescale):
  sched = schedules.make_schedule(kind, rescale_zero_terminal_snr=rescale, **SD_BETAS)
  ref = _diffusers("DDIMScheduler", beta_schedule=kind, clip_sample=False, set_alpha_to_one=False,
                   steps_offset=1, timestep_spacing=spacing, prediction_type=prediction_type,
                   rescale_betas_zero_snr=rescale, **SD_BETAS)
  x_T = _x_T()
  expected = _diffusers_trajectory(ref, x_T, 20)
  ours = samplers.sample(_fake_model_jax, sched, x_T, sampler="ddim", num_steps=20,
                         prediction_type=prediction_type, timestep_spacing=spacing,
                         steps_offset=1, set_alpha_to_one=False)
  assert np.isfinite(expected).all()
  np.testing.assert_allclose(ours, expected, **TRAJ_TOL)


@pytest.mark.parity
@pytest.mark.parametrize("num_steps,prediction_type,spacing,rescale,final_sigmas_type", [
    (20, "epsilon", "linspace", False, "zero"),  # SD 1.x with DPM++ 2M
    (10, "epsilon", "leading", False, "sigma_min"),  # lower_order_final branch
    (20, "v_prediction", "trailing", True, "zero"),  # zero terminal SNR
])
def test_dpmpp_2m_trajectory_matches_diffusers(num_steps, prediction_type, spacing, rescale,
                                               final_sigmas_type):
  sched = schedules.make_schedule("scaled_linear", rescale_zero_terminal_snr=rescale, **SD_BETAS)
  ref = _diffusers("DPMSolverMultistepScheduler", beta_schedule="scaled_linear",
                   algorithm_type="dpmsolver++", solver_order=2, prediction_type=prediction_type,
                   timestep_spacing=spacing, steps_offset=1, rescale_betas_zero_snr=rescale,
                   final_sigmas_type=final_sigmas_type, **SD_BETAS)
  x_T = _x_T(3)
  expected = _diffusers_trajectory(ref, x_T, num_steps)
  ours = samplers.sample(_fake_model_jax, sched, x_T, sampler="dpmpp_2m", num_steps=num_steps,
                         prediction_type=prediction_type, timestep_spacing=spacing,
                         steps_offset=1, final_sigmas_type=final_sigmas_type)
  assert np.isfinite(expected).all()
  np.testing.assert_allclose(ours, expected, **TRAJ_TOL)


# ----------------------------------------------------- randomness, compiling


def test_ddim_eta_draws_noise_from_rng():
  sched = schedules.make_schedule("scaled_linear", **SD_BETAS)
  run = jax.jit(lambda rng: samplers.sample(_fake_model_jax, sched, _x_T(), rng, sampler="ddim",
                                            num_steps=5, eta=1.0))
  np.testing.assert_array_equal(run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(0)))
  assert np.abs(np.asarray(run(jax.random.PRNGKey(0)) - run(jax.random.PRNGKey(1)))).max() > 1e-2


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_sampler_compiles_once_and_is_deterministic_per_seed(sampler):
  chex.clear_trace_counter()  # `run` below shares its code object across params.
  sched = schedules.make_schedule("scaled_linear", **SD_BETAS)
  model_traces = []

  def denoise_fn(x, t):
    model_traces.append(1)
    return _fake_model_jax(x, t)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(x, rng):
    return samplers.sample(denoise_fn, sched, x, rng, sampler=sampler, num_steps=20)

  x_T = _x_T()
  first, again, other_seed = (np.asarray(run(x_T, jax.random.PRNGKey(s))) for s in (0, 0, 1))
  run(_x_T(1), jax.random.PRNGKey(2))
  # One model trace for 20 steps: the loop is a lax loop, not unrolled Python.
  assert len(model_traces) == 1
  assert first.shape == SHAPE and first.dtype == np.float32 and np.isfinite(first).all()
  np.testing.assert_array_equal(first, again)
  if sampler == "ddpm":
    assert np.abs(first - other_seed).max() > 1e-2
  else:  # DDIM with eta=0 and DPM-Solver++ are deterministic given x_T.
    np.testing.assert_array_equal(first, other_seed)


def test_sample_keeps_dtype():
  sched = schedules.make_schedule("scaled_linear", **SD_BETAS)
  out = samplers.sample(_fake_model_jax, sched, _x_T().astype(jnp.bfloat16), sampler="dpmpp_2m",
                        num_steps=4)
  assert out.dtype == jnp.bfloat16 and np.isfinite(np.asarray(out, np.float32)).all()


def test_sample_argument_errors():
  sched = schedules.make_schedule("linear", 100)
  with pytest.raises(ValueError, match="ddim"):
    samplers.sample(_fake_model_jax, sched, _x_T(), sampler="euler")
  with pytest.raises(ValueError, match="eta"):
    samplers.sample(_fake_model_jax, sched, _x_T(), sampler="dpmpp_2m", eta=0.5)
  with pytest.raises(ValueError, match="rng"):
    samplers.sample(_fake_model_jax, sched, _x_T(), sampler="ddpm")
  with pytest.raises(ValueError, match="prediction_type"):
    samplers.sample(_fake_model_jax, sched, _x_T(), prediction_type="eps")


# ---------------------------------------------------------------- guidance


def test_classifier_free_guidance_single_batched_call():
  calls = []

  def model_fn(x, t, context):
    calls.append((x.shape, t.shape, jax.tree_util.tree_map(jnp.shape, context)))
    return x * context["scale"][:, None, None, None] + t[:, None, None, None]

  cond = {"scale": jnp.array([2.0, 3.0])}
  uncond = {"scale": jnp.array([0.5, 0.5])}
  denoise_fn = samplers.classifier_free_guidance(model_fn, cond, uncond, 7.5)
  x = _x_T()
  t = jnp.array([10, 20], jnp.int32)
  out = denoise_fn(x, t)
  assert calls == [((4,) + SHAPE[1:], (4,), {"scale": (4,)})]
  out_cond = model_fn(x, t, cond)
  out_uncond = model_fn(x, t, uncond)
  np.testing.assert_allclose(out, out_uncond + 7.5 * (out_cond - out_uncond), rtol=1e-6)
  # Scale 1 is the plain conditional model.
  np.testing.assert_allclose(samplers.classifier_free_guidance(model_fn, cond, uncond, 1.0)(x, t),
                             out_cond, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("batch,separate", [(1, None), (7, None), (8, None), (9, None),
                                            (9, False), (1, True)])
def test_classifier_free_guidance_passes(batch, separate):
  """Two calls on the batch or one on the doubled batch: the same guided output. On CPU (the
  test platform) None splits from SEPARATE_PASSES_MIN_BATCH images."""
  calls = []

  def model_fn(x, t, context):
    calls.append(x.shape[0])
    return jnp.tanh(x * context[:, None, None, None]) + t[:, None, None, None] * 0.01

  rng = np.random.default_rng(batch)
  cond, uncond = (jnp.asarray(rng.uniform(0.5, 2.0, batch), jnp.float32) for _ in range(2))
  x = jnp.asarray(rng.standard_normal((batch, 4, 4, 2)), jnp.float32)
  t = jnp.arange(batch, dtype=jnp.int32) * 7
  out = samplers.classifier_free_guidance(model_fn, cond, uncond, 5.0, separate)(x, t)
  assert jax.default_backend() == "cpu"
  split = separate if separate is not None else batch >= samplers.SEPARATE_PASSES_MIN_BATCH
  assert calls == ([batch, batch] if split else [2 * batch])
  want_c, want_u = model_fn(x, t, cond), model_fn(x, t, uncond)
  np.testing.assert_allclose(out, want_u + 5.0 * (want_c - want_u), rtol=1e-5, atol=1e-5)
