"""Stage "controlnet": errors before training (fast), and two steps end to end on a tiny random base
model with a resume and sampling from the result (slow)."""

import os
import subprocess
import sys

import numpy as np
import pytest
from flax import traverse_util

from latent_diffusion_jax.core.errors import MissingInputError, UserInputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
  """A tiny random LDM (tests/tiny_bundles.py "ldm": 16px, f2 VAE, LDM text transformer) as a
  native export: one of the sources training.base_checkpoint reads."""
  from tiny_bundles import tiny_bundle
  from latent_diffusion_jax.interop.native import export_native
  tmp = tmp_path_factory.mktemp("cnet_base")
  bundle = tiny_bundle(str(tmp), "ldm")
  export_native(bundle, str(tmp / "base"))
  return str(tmp / "base"), bundle


def _config(base_path: str, data_dir: str):
  """configs/shapes_controlnet.py:tiny with the model keys of the tiny base."""
  from latent_diffusion_jax.core.config import load_config_file
  c = load_config_file(os.path.join(ROOT, "configs", "shapes_controlnet.py") + ":tiny")
  m = c.model
  m.image_size = 16
  m.unet.block_out_channels, m.unet.attention_levels = (32, 64), (True, False)
  m.unet.layers_per_block, m.unet.num_heads, m.unet.cross_attention_dim = 1, 4, 32
  m.unet.norm_num_groups = 32
  m.vae.block_out_channels, m.vae.layers_per_block, m.vae.norm_num_groups = (32, 64), 1, 32
  m.text_encoder.max_length = 12
  m.text_encoder.ldm.width, m.text_encoder.ldm.depth, m.text_encoder.ldm.heads = 32, 2, 4
  m.controlnet.conditioning_embedding_out_channels = (16, 32)  # f2
  c.training.base_checkpoint = base_path
  c.data.data_dir = data_dir
  c.data.num_train, c.data.num_test = 32, 8
  c.training.keep_checkpoints = 5
  return c


def _stage(config, workdir):
  from latent_diffusion_jax.core import parallel
  from latent_diffusion_jax.training import stages
  mesh = parallel.create_mesh(config.mesh.shape)
  return stages.get("controlnet")(config, str(workdir), mesh, config.training.batch_size)


def test_missing_base_model_and_mismatching_layout_are_named(base_model, tmp_path):
  base_path, _ = base_model
  c = _config(str(tmp_path / "nowhere"), str(tmp_path / "tfds"))
  with pytest.raises(MissingInputError, match="training.base_checkpoint"):
    _stage(c, tmp_path / "w1")
  c.training.base_checkpoint = ""
  with pytest.raises(UserInputError, match="training.base_checkpoint"):
    _stage(c, tmp_path / "w2")
  c = _config(base_path, str(tmp_path / "tfds"))
  c.model.unet.block_out_channels = (32, 48)
  with pytest.raises(UserInputError, match=r"model\.unet\.block_out_channels=\(32, 48\)"):
    _stage(c, tmp_path / "w3")
  c = _config(base_path, str(tmp_path / "tfds"))
  c.model.controlnet.conditioning_embedding_out_channels = (16, 32, 96, 256)
  with pytest.raises(UserInputError, match="conditioning_embedding_out_channels"):
    _stage(c, tmp_path / "w4")
  c = _config(base_path, str(tmp_path / "tfds"))
  c.data.control = ""
  with pytest.raises(UserInputError, match="data.control"):
    _stage(c, tmp_path / "w5")


def test_train_py_names_a_missing_base_model(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run(
      [sys.executable, "train.py", "--config", "configs/shapes_controlnet.py:tiny", "--workdir",
       str(tmp_path / "w"), f"--config.training.base_checkpoint={tmp_path / 'missing'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "training.base_checkpoint" in proc.stderr and "does not exist" in proc.stderr
  assert "Traceback" not in proc.stderr


def _flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


@pytest.mark.slow
def test_two_steps_resume_and_sample(base_model, tmp_path):
  from latent_diffusion_jax.artifacts.loader import Source, load_bundle
  from latent_diffusion_jax.artifacts.workdir import CONTROLNET_KIND, load_controlnet, read_run
  from latent_diffusion_jax.training.driver import train
  base_path, bundle = base_model
  c = _config(base_path, str(tmp_path / "tfds"))
  workdir = str(tmp_path / "cnet")
  result = train(c, workdir)
  assert int(result["step"]) == 2 and not result["preempted"]
  _, step, _, meta = read_run(workdir)
  assert step == 2 and meta["kind"] == CONTROLNET_KIND
  assert meta["base_checkpoint"] == base_path

  module, params, info = load_controlnet(workdir, use_ema=False)
  assert info["base_checkpoint"] == base_path and info["latent_scale_factor"] == 0.5
  flat, base = _flat(params), _flat(bundle.unet_params)
  # The copy of the base UNet's encoder half: the zero convolutions held the gradient back from it
  # in both steps (the first at learning rate 0), so it still equals the base exactly ...
  copied = [k for k in flat if k.split("/")[0] in ("conv_in", "time_embedding", "mid_block")
            or k.startswith("down_blocks_")]
  assert copied and all(np.array_equal(flat[k], base[k]) for k in copied)
  # ... while the zero convolutions learned.
  zero_convs = [k for k in flat if k.startswith("controlnet_down_blocks_")
                or k.startswith("controlnet_mid_block")]
  assert zero_convs and any(np.abs(flat[k]).max() > 0 for k in zero_convs)
  # Only the ControlNet is in the train state (the base stays out of the optimizer).
  assert not any(k.startswith("up_blocks_") for k in flat)

  c.training.num_steps = 3
  resumed = train(c, workdir)
  assert int(resumed["step"]) == 3 and read_run(workdir)[1] == 3

  from latent_diffusion_jax.data import control, shapes
  from latent_diffusion_jax.sampling.controlnet import Control
  from latent_diffusion_jax.sampling.generation import generate
  base_bundle = load_bundle(Source(base_path))
  module, params, _ = load_controlnet(workdir)
  attrs = shapes.sample_attributes(shapes.example_rng(0, "test"), "test")
  hint = control.hint_from_coverage(shapes.coverage(attrs, 16), "outline")[None]
  kw = dict(seed=0, num_steps=2, guidance_scale=3.0)
  with_control = generate(base_bundle, ["a red circle"], **kw,
                          controlnets=[Control(module, params, hint, 1.0)])
  without = generate(base_bundle, ["a red circle"], **kw)
  assert with_control.shape == without.shape == (1, 16, 16, 3)
  assert np.isfinite(with_control).all()
  assert not np.array_equal(with_control, without)
