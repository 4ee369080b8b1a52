"""The small shared pieces: the user-error family and how commands end on it, pixel conversions,
the typed diffusion description, and the one text length."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion_jax.cli import errors as cli_errors
from latent_diffusion_jax.core import errors, pixels
from latent_diffusion_jax.core.config import load_config_file
from latent_diffusion_jax.diffusion.spec import DiffusionSpec
from latent_diffusion_jax.models import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_user_errors_end_commands_without_traceback_and_others_propagate():
  @cli_errors.exits_on_user_error("tool")
  def bad_input(_):
    raise errors.UserInputError("model.x=3 is invalid; valid: 1, 2.")

  with pytest.raises(SystemExit) as info:
    bad_input([])
  assert info.value.code == "tool: UserInputError: model.x=3 is invalid; valid: 1, 2."

  @cli_errors.exits_on_user_error("tool")
  def bug(_):
    raise ValueError("an internal shape error")

  with pytest.raises(ValueError, match="internal shape error"):
    bug([])


def test_family_members_keep_their_builtin_types():
  assert issubclass(errors.UserInputError, ValueError)
  assert issubclass(errors.MissingInputError, FileNotFoundError)
  assert issubclass(errors.StorageError, OSError)
  from latent_diffusion_jax.checkpoints.checkpointer import CheckpointRestoreError, CheckpointWriteError
  from latent_diffusion_jax.interop.convert import WeightImportError
  from latent_diffusion_jax.interop.files import PickleRefusedError
  for cls in (CheckpointRestoreError, CheckpointWriteError, WeightImportError, PickleRefusedError):
    assert issubclass(cls, errors.UserError), cls


def _run(args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


def test_train_py_reports_a_bad_key_in_one_line(tmp_path):
  proc = _run(["train.py", "--config", "configs/shapes_ldm.py:tiny", "--config.stage=bogus",
               "--workdir", str(tmp_path / "run")])
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  assert "train.py: UserInputError: Unknown config.stage 'bogus'" in proc.stderr


def test_sample_py_reports_a_missing_model_in_one_line(tmp_path):
  proc = _run(["sample.py", "--model", str(tmp_path / "nothing"), "--prompt", "a red circle",
               "--out", str(tmp_path / "out")])
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  assert "MissingInputError" in proc.stderr and str(tmp_path / "nothing") in proc.stderr


def test_pixel_conversions_round_trip_uint8():
  values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  as_float = pixels.to_float(jnp.asarray(values))
  assert as_float.dtype == jnp.float32
  assert float(as_float.min()) == -1.0 and float(as_float.max()) == 1.0
  np.testing.assert_array_equal(pixels.to_uint8(np.asarray(as_float)), values)
  # Out-of-range floats clip; [0, 1] output for float consumers.
  assert pixels.to_uint8(np.array([-3.0, 3.0])).tolist() == [0, 255]
  np.testing.assert_allclose(pixels.to_unit(np.array([-1.0, 0.0, 1.0])), [0.0, 0.5, 1.0])


def test_diffusion_spec_round_trips_and_rejects_unknown_keys():
  config = load_config_file(os.path.join(ROOT, "configs/shapes_ldm.py:tiny"))
  spec = DiffusionSpec.from_config(config.diffusion)  # training-only keys are left out
  assert spec.schedule == config.diffusion.schedule
  assert spec.prediction_type == config.diffusion.prediction_type
  assert DiffusionSpec.from_dict(spec.to_dict()) == spec
  assert "timestep_spacing" not in spec.to_dict()
  pinned = DiffusionSpec(timestep_spacing="trailing", steps_offset=0)
  assert pinned.scheduler_overrides() == {"timestep_spacing": "trailing", "steps_offset": 0}
  with pytest.raises(errors.UserInputError, match="loss_weighting"):
    DiffusionSpec.from_dict({"loss_weighting": "min_snr"})
  with pytest.raises(errors.UserInputError, match="prediction_type"):
    DiffusionSpec(prediction_type="x0")
  schedule = spec.noise_schedule()
  assert schedule.num_timesteps == spec.num_timesteps


@pytest.mark.parametrize("kind", ["clip", "ldm_transformer"])
def test_text_length_has_one_source(kind):
  config = load_config_file(os.path.join(ROOT, "configs/sd15.py:tiny"))
  config.model.text_encoder.kind = kind
  config.model.text_encoder.max_length = 9
  module = build.build_text_encoder(config.model)
  length = module.max_position_embeddings if kind == "clip" else module.max_length
  assert length == 9
  variables = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 9), jnp.int32))
  # `tiny` shrinks whichever text encoder is chosen (the LDM transformer was once left at 32 x 1280)
  assert sum(x.size for x in jax.tree.leaves(variables)) < 200_000
  out = module.apply(variables, jnp.zeros((2, 9), jnp.int32))
  assert out.context.shape[:2] == (2, 9)
  assert (out.pooled is None) == (kind == "ldm_transformer")


def test_building_the_encode_job_leaves_no_temporary_directory(tmp_path, monkeypatch):
  import tempfile
  from latent_diffusion_jax.training import frozen
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  config = load_config_file(os.path.join(ROOT, "configs/shapes_ldm.py:tiny"))
  config.frozen.vae = ""
  encoder, tokenizer, _ = frozen.build_encoder(config)
  assert tokenizer("a red circle")["input_ids"]  # loaded into memory, usable after cleanup
  assert list(tmp_path.iterdir()) == []
