"""A VQ first stage end to end, as a user runs it: train.py stage 1 (configs/shapes_vq_autoencoder.py)
-> train.py stage 2 on its pre-quantization latents (configs/shapes_ldm_vq.py, CLIP-conditioned so
that diffusers can hold it) -> sample.py -> export native and diffusers (loaded by diffusers), and
the error for a stage-2 config whose autoencoder.kind does not match frozen.vae."""

import json
import os

import numpy as np
import pytest
from safetensors import safe_open

from test_end_to_end import _run

pytestmark = pytest.mark.slow
SMALL_UNET = ["--config.model.unet.block_out_channels=(16,32)",
              "--config.model.unet.attention_levels=(True,False)", "--config.model.unet.num_heads=2",
              "--config.model.unet.norm_num_groups=8", "--config.model.unet.mid_block_attention=False"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  base = tmp_path_factory.mktemp("vq_e2e")
  data = str(base / "tfds")
  ae, ldm = str(base / "ae"), str(base / "ldm")
  _run(["train.py", "--config", "configs/shapes_vq_autoencoder.py:tiny", "--workdir", ae,
        f"--config.data.data_dir={data}"])
  # Compiling the step dominates on a loaded 2-core CPU: the smallest UNet that still
  # cross-attends to the text keeps it short.
  _run(["train.py", "--config", "configs/shapes_ldm_vq.py:tiny,clip", "--workdir", ldm,
        f"--config.data.data_dir={data}", f"--config.frozen.vae={ae}", *SMALL_UNET])
  return base, ae, ldm, data


def test_vq_stage2_trains_on_the_vq_first_stage(trained):
  _, ae, ldm, _ = trained
  summary = json.load(open(os.path.join(ae, "stage1.json")))
  assert summary["kind"] == "vq" and summary["latent_scale_factor"] > 0
  assert "2" in os.listdir(os.path.join(ldm, "checkpoints"))
  with safe_open(os.path.join(ldm, "frozen", "vae.safetensors"), "np") as f:
    assert "quantize/embedding/embedding" in f.keys()
  # Pre-encoded once as deterministic VQ latents (float16 [N, 8, 8, 3]).
  cache = os.listdir(os.path.join(ldm, "latents"))
  assert len(cache) == 1 and cache[0].startswith("latents_")
  assert np.load(os.path.join(ldm, "latents", cache[0])).shape == (64, 8, 8, 3)
  # The fixed-seed grid of the training hook decodes through the quantizer too.
  assert os.path.isfile(os.path.join(ldm, "samples", "step_0000002", "grid.png"))
  from latent_diffusion_jax.artifacts.workdir import load_bundle
  bundle = load_bundle(ldm)
  assert bundle.first_stage_kind == "vq" and bundle.latent_channels == 3
  assert bundle.scaling_factor == pytest.approx(summary["latent_scale_factor"])


def test_sample_and_export_a_vq_run(trained):
  base, _, ldm, _ = trained
  out = str(base / "samples")
  _run(["sample.py", "--checkpoint", ldm, "--prompt", "a red circle in the top left",
        "--prompt", "a blue square in the bottom right", "--steps", "3", "--out", out])
  assert len(json.load(open(os.path.join(out, "settings.json")))["files"]) == 2

  native = str(base / "native")
  _run(["-m", "latent_diffusion_jax.cli.export", "--checkpoint", ldm, "--format", "native",
        "--out", native])
  from latent_diffusion_jax.interop.native import load_native
  assert type(load_native(native).vae).__name__ == "VQModel"

  pipeline = str(base / "diffusers")
  _run(["-m", "latent_diffusion_jax.cli.export", "--checkpoint", ldm, "--format", "diffusers",
        "--out", pipeline])
  code = ("import sys, diffusers; p = diffusers.DiffusionPipeline.from_pretrained(sys.argv[1], "
          "local_files_only=True); print(type(p).__name__, type(p.vqvae).__name__, "
          "type(p.bert).__name__, p.vqvae.config.num_vq_embeddings)")
  proc = _run(["-c", code, pipeline])
  assert proc.stdout.split()[-4:] == ["LDMTextToImagePipeline", "VQModel", "CLIPTextModel", "64"]


def test_a_kl_config_refuses_a_vq_first_stage(trained, tmp_path):
  _, ae, _, data = trained
  proc = _run(["train.py", "--config", "configs/shapes_ldm.py:tiny", "--workdir", str(tmp_path / "w"),
               f"--config.data.data_dir={data}", f"--config.frozen.vae={ae}"], expect_ok=False)
  assert proc.returncode != 0
  assert "autoencoder.kind='kl'" in proc.stderr and "--config.autoencoder.kind=vq" in proc.stderr
