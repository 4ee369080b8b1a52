"""Stage-1 training: image metrics, sharded steps equal one device, and an end-to-end run whose
checkpoint restores for resumption and loads for stage 2."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
import pytest

from latent_diffusion_jax.core import parallel
from latent_diffusion_jax.core.config import load_config_file
from latent_diffusion_jax.models import build
from latent_diffusion_jax.models.autoencoder import AutoencoderKL
from latent_diffusion_jax.training import startup
from latent_diffusion_jax.evaluation.image_metrics import gaussian_window, psnr, ssim

RULES = parallel.DEFAULT_LOGICAL_AXIS_RULES
CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "shapes_autoencoder.py")


def _ssim_numpy(x, y, size=11, sigma=1.5):
  """SSIM by direct window sums over every valid position, images in [0, 1]."""
  t = np.arange(size) - (size - 1) / 2
  g = np.exp(-t**2 / (2 * sigma**2))
  w = np.outer(g, g) / np.outer(g, g).sum()
  c1, c2 = 0.01**2, 0.03**2
  b, h, wd, c = x.shape
  out = np.zeros(b)
  for n in range(b):
    vals = []
    for ch in range(c):
      for i in range(h - size + 1):
        for j in range(wd - size + 1):
          a, bb = x[n, i:i + size, j:j + size, ch], y[n, i:i + size, j:j + size, ch]
          ma, mb = (w * a).sum(), (w * bb).sum()
          va, vb = (w * a * a).sum() - ma**2, (w * bb * bb).sum() - mb**2
          cov = (w * a * bb).sum() - ma * mb
          vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    out[n] = np.mean(vals)
  return out


def test_ssim_matches_direct_numpy_and_psnr_known_value():
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (2, 14, 13, 2))
  y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1)
  ours = ssim(jnp.asarray(2 * x - 1, jnp.float32), jnp.asarray(2 * y - 1, jnp.float32))
  np.testing.assert_allclose(ours, _ssim_numpy(x, y), rtol=1e-4, atol=1e-5)
  assert float(ssim(jnp.asarray(x), jnp.asarray(x))[0]) == pytest.approx(1.0, abs=1e-5)
  assert gaussian_window().sum() == pytest.approx(1.0)
  # [-1, 1] images off by 0.2 everywhere: MSE on [0, 1] is 0.01 -> 20 dB.
  a = jnp.zeros((1, 4, 4, 3))
  assert float(psnr(a, a + 0.2)[0]) == pytest.approx(20.0, rel=1e-5)


def _tiny_config(**overrides) -> mc.ConfigDict:
  c = load_config_file(CONFIG + ":tiny")
  c.model.image_size = 16
  c.model.vae.block_out_channels = (8, 16)
  c.model.vae.norm_num_groups = 4
  c.model.vae.mid_block_attention = False
  c.autoencoder.disc_channels = 8
  c.autoencoder.disc_num_layers = 1
  for k, v in overrides.items():
    node = c
    *path, leaf = k.split(".")
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


def _filled_state(abstract, seed: int = 0):
  """Concrete state for an abstract one without compiling init: params (and their EMA copy) get
  fan-in-scaled random values chosen by their path, everything else (optimizer moments, counts,
  step, rng) zeros, which is what a fresh optimizer state holds."""
  def leaf(path, x):
    keys = [getattr(k, "name", getattr(k, "key", None)) for k in path]
    if keys[0] in ("params", "ema_params"):
      rng = np.random.default_rng([seed] + [ord(c) for c in "/".join(map(str, keys[1:]))])
      noise = rng.standard_normal(x.shape)
      if keys[-1] == "kernel":
        value = noise / np.sqrt(np.prod(x.shape[:-1]))
      elif keys[-1] == "scale":
        value = 1.0 + 0.1 * noise
      else:
        value = 0.1 * noise
      return jax.device_put(value.astype(x.dtype), x.sharding)
    return jax.device_put(np.zeros(x.shape, x.dtype), x.sharding)
  return jax.tree_util.tree_map_with_path(leaf, abstract)


def _run_steps(config, mesh_shape, batch, steps):
  from latent_diffusion_jax.training.stages import autoencoder as T
  from latent_diffusion_jax.training.autoencoder_step import make_train_step
  mesh = parallel.create_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
  vae = build.build_first_stage(config)
  task = T.build_task(config, vae)
  tx, lr = T.build_optimizer(config, task)
  with parallel.mesh_context(mesh, RULES):
    abstract, shardings = parallel.sharded_abstract_state(
        T.build_init_fn(config, vae), jax.random.key(0), mesh=mesh, rules=RULES)
    state = _filled_state(abstract)
    fn = startup.compile_step(make_train_step(task, tx, lr, ema_decay=config.optimizer.ema_decay),
                            state, shardings, parallel.global_batch(batch, mesh), (), mesh)
    metrics = []
    for _ in range(steps):
      state, m = fn(state, parallel.global_batch(batch, mesh))
      metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


def test_sharded_steps_equal_single_device():
  """3 steps (the adversarial branch from the 2nd) on mesh (2, 2, 2) and on one device."""
  config = _tiny_config(**{"autoencoder.disc_start": 1, "optimizer.ema_decay": 0.9,
                           "optimizer.learning_rate": 1e-3})
  batch = {"images": np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)}
  ref_state, ref_metrics = _run_steps(config, (1, 1, 1), batch, 3)
  state, metrics = _run_steps(config, (2, 2, 2), batch, 3)
  assert [float(m["disc_factor"]) for m in metrics] == [0.0, 1.0, 1.0]
  for m, r in zip(metrics, ref_metrics):
    assert bool(m["finite"])
    for k in ("loss", "d_loss", "disc_weight", "kl"):
      np.testing.assert_allclose(m[k], r[k], rtol=1e-4, err_msg=k)
  # Tolerance: different reduction orders over devices, amplified by Adam's normalization in the
  # first steps; updates are ~lr=1e-3 per step.
  for part in ("vae", "discriminator", "logvar"):
    for a, b in zip(jax.tree.leaves(state.params[part]), jax.tree.leaves(ref_state.params[part])):
      np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4, err_msg=part)


def test_train_checkpoint_restore_and_load_for_stage2(tmp_path):
  """A 2-step run (the adversarial branch in step 2) writes stage1.json and a checkpoint that
  restores onto the abstract state resumption uses (discriminator, its optimizer state) and that
  stage 2's loader reads. The host loop's resume logic itself is covered by test_checkpointing."""
  from latent_diffusion_jax.training import driver
  from latent_diffusion_jax.training.stages import autoencoder as T
  from latent_diffusion_jax.checkpoints.checkpointer import Checkpointer
  from latent_diffusion_jax.artifacts.workdir import STAGE1_SUMMARY
  from latent_diffusion_jax.artifacts.workdir import load_first_stage
  workdir = str(tmp_path / "ae")
  config = _tiny_config(**{"data.data_dir": str(tmp_path / "tfds"),
                           "training.async_checkpointing": False})
  result = driver.train(config, workdir)
  assert result["step"] == 2 and result["last_metrics"]["disc_factor"] == 1.0
  with open(os.path.join(workdir, STAGE1_SUMMARY)) as f:
    summary = json.load(f)
  assert set(summary) >= {"psnr", "ssim", "latent_scale_factor", "step"}
  assert np.isfinite(summary["psnr"]) and summary["latent_scale_factor"] > 0

  final = jax.device_get(result["state"])
  mesh = parallel.create_mesh((1, 1, 1), devices=jax.devices()[:1])
  abstract, _ = parallel.sharded_abstract_state(
      T.build_init_fn(config, build.build_first_stage(config)), jax.random.key(0), mesh=mesh,
      rules=RULES)
  with Checkpointer(workdir, read_only=True) as ckpt:
    restored, data, meta = ckpt.restore(abstract_state=abstract)
  assert meta["kind"] == "autoencoder" and data is not None
  assert set(restored.params) == {"vae", "logvar", "discriminator"}
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(final)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  vae, params, scale = load_first_stage(workdir)
  assert isinstance(vae, AutoencoderKL)
  assert scale == pytest.approx(summary["latent_scale_factor"])
  np.testing.assert_array_equal(params["decoder"]["conv_out"]["kernel"],
                                final.params["vae"]["decoder"]["conv_out"]["kernel"])


def test_layouts_first_stage_trains_on_multi_shape_images(tmp_path):
  """`shapes_autoencoder.py` (`make demo`'s first stage, 850 steps) and `:layouts` (the conditioning
  demos', 2400 steps) train on the layout variant; the VQ demo's stays on single shapes. Shrunk to
  2 steps it trains and evaluates on layout images (its data split is the layout one), and stage 2
  loads it."""
  from latent_diffusion_jax.training import driver
  from latent_diffusion_jax.artifacts.workdir import load_first_stage
  full = load_config_file(CONFIG + ":layouts")
  assert full.data.shapes_variant == "layout" and full.training.num_steps == 2400
  assert full.autoencoder.disc_start < full.training.num_steps
  demo = load_config_file(CONFIG)
  assert demo.data.shapes_variant == "layout" and demo.training.num_steps == 850
  assert demo.autoencoder.disc_start < demo.training.num_steps
  vq = load_config_file(os.path.join(os.path.dirname(CONFIG), "shapes_vq_autoencoder.py"))
  assert vq.data.shapes_variant == "single"
  c = load_config_file(CONFIG + ":tiny,layouts")
  tiny = _tiny_config(**{"data.data_dir": str(tmp_path / "tfds"),
                         "training.async_checkpointing": False})
  tiny.data.shapes_variant = c.data.shapes_variant
  tiny.training.num_steps = c.training.num_steps
  result = driver.train(tiny, str(tmp_path / "ae"))
  assert result["step"] == 2
  names = os.listdir(tmp_path / "tfds")
  assert "shape_layouts" in names and "captioned_shapes" not in names, names
  vae, params, scale = load_first_stage(str(tmp_path / "ae"))
  assert isinstance(vae, AutoencoderKL) and scale > 0
