"""Exports for PyTorch users: diffusers directories and the native format, proven by round trips.

Round trips through our own loaders must be bit-identical in float32. The diffusers directory
must load offline in diffusers/transformers with no missing or unexpected keys and sample the
same image as our sampler (max abs difference <= 2e-3 on [0, 1] pixels).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors import safe_open

from latent_diffusion_jax.cli import export as export_cli
from latent_diffusion_jax.interop.diffusers import load_pipeline
from latent_diffusion_jax.interop.export_diffusers import ExportError, export_diffusers
from latent_diffusion_jax.interop.native import export_native, load_native
from tiny_bundles import assert_trees_equal, cached_bundle

IMAGE_ATOL = 2e-3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
  return cached_bundle("sd1", tmp_path_factory)


@pytest.fixture(scope="module")
def sd1_diffusers(sd1, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("sd1_diffusers"))
  export_diffusers(sd1, out)
  return out


def _assert_same_model(a, b, text=True, same_unet_fields=True):
  assert_trees_equal(a.unet_params, b.unet_params)
  assert_trees_equal(a.vae_params, b.vae_params)
  if text:
    assert_trees_equal(a.text_encoder_params, b.text_encoder_params)
  assert a.vae == b.vae
  if same_unet_fields:
    assert a.unet == b.unet
  assert a.scaling_factor == b.scaling_factor and a.diffusion == b.diffusion
  assert (a.image_size, a.max_length) == (b.image_size, b.max_length)


def test_diffusers_round_trip_is_bit_identical(sd1, sd1_diffusers):
  back = load_pipeline(sd1_diffusers)
  _assert_same_model(sd1, back)
  assert back.text_encoder == sd1.text_encoder
  assert sorted(os.listdir(back.tokenizer_path)) == sorted(os.listdir(sd1.tokenizer_path))
  with open(os.path.join(sd1_diffusers, "model_index.json")) as f:
    index = json.load(f)
  assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
  assert index["requires_safety_checker"] is False
  with open(os.path.join(sd1_diffusers, "scheduler", "scheduler_config.json")) as f:
    sched = json.load(f)
  assert sched["_class_name"] == "DDIMScheduler"
  assert (sched["steps_offset"], sched["set_alpha_to_one"], sched["timestep_spacing"],
          sched["clip_sample"]) == (1, False, "leading", False)


def test_penultimate_text_encoder_is_written_cut_like_sd2(tmp_path_factory):
  sd2 = cached_bundle("sd2", tmp_path_factory)
  out = str(tmp_path_factory.mktemp("sd2_diffusers"))
  export_diffusers(sd2, out)
  back = load_pipeline(out)
  # diffusers states heads per level; a head width is the same attention.
  _assert_same_model(sd2, back, text=False, same_unet_fields=False)
  assert back.unet.clone(num_heads=None, head_dim=8) == sd2.unet
  te = back.text_encoder
  assert (te.num_hidden_layers, te.output_layer) == (sd2.text_encoder.num_hidden_layers - 1, "last")
  ids = np.arange(sd2.max_length, dtype=np.int32)[None] % 50
  np.testing.assert_allclose(np.asarray(back.encode_text(ids)), np.asarray(sd2.encode_text(ids)),
                             atol=1e-6, rtol=0)


def test_native_round_trip_is_bit_identical(sd1, tmp_path_factory, tmp_path):
  ldm = cached_bundle("ldm", tmp_path_factory)
  for bundle, name in ((sd1, "sd1"), (ldm, "ldm")):
    written = export_native(bundle, str(tmp_path / name))
    back = load_native(str(tmp_path / name))
    _assert_same_model(bundle, back)
    assert back.text_encoder == bundle.text_encoder and back.metadata["step"] == 1234
    assert os.path.isdir(written["tokenizer"])
  with pytest.raises(ExportError, match="--format native"):
    export_diffusers(ldm, str(tmp_path / "ldm_diffusers"))


def test_diffusers_export_refuses_bundles_without_tokenizer(sd1, tmp_path):
  import dataclasses
  with pytest.raises(ExportError, match="tokenizer"):
    export_diffusers(dataclasses.replace(sd1, tokenizer_path=None), str(tmp_path))


def test_fp16_and_bf16_exports_and_header_metadata(sd1, tmp_path):
  export_diffusers(sd1, str(tmp_path / "fp16"), dtype="float16")
  for sub, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                    ("text_encoder", "model")):
    with safe_open(str(tmp_path / "fp16" / sub / f"{name}.safetensors"), "np") as f:
      meta = f.metadata()
      assert {f.get_tensor(k).dtype for k in f.keys()} == {np.dtype("float16")}
    with open(tmp_path / "fp16" / sub / "config.json") as f:
      assert json.loads(meta["config"]) == json.load(f)
    assert meta["format"] == "pt" and meta["step"] == "1234"
    assert meta["latent_diffusion_jax_version"] == "0.1.0"
    assert json.loads(meta["training_config"]) == {"note": "tiny test model"}
  export_native(sd1, str(tmp_path / "bf16"), dtype="bfloat16")
  back = load_native(str(tmp_path / "bf16"))
  leaves = jax.tree.leaves(back.unet_params)
  assert {x.dtype.name for x in leaves} == {"bfloat16"}
  np.testing.assert_allclose(np.asarray(leaves[0], np.float32),
                             np.asarray(jax.tree.leaves(sd1.unet_params)[0]), rtol=1e-2)


@pytest.mark.parity
def test_diffusers_loads_the_export_with_no_missing_or_unexpected_keys(sd1_diffusers):
  diffusers = pytest.importorskip("diffusers")
  transformers = pytest.importorskip("transformers")
  for cls, sub in ((diffusers.UNet2DConditionModel, "unet"), (diffusers.AutoencoderKL, "vae"),
                   (transformers.CLIPTextModel, "text_encoder")):
    _, info = cls.from_pretrained(os.path.join(sd1_diffusers, sub), local_files_only=True,
                                  output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"}
    assert not problems and not info["error_msgs"], (sub, info)


@pytest.mark.parity
def test_diffusers_pipeline_samples_the_image_our_sampler_samples(sd1, sd1_diffusers):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from latent_diffusion_jax.core import parallel
  from latent_diffusion_jax import sampling
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd1_diffusers, local_files_only=True)
  assert isinstance(pipe.scheduler, diffusers.DDIMScheduler) and pipe.safety_checker is None
  prompt = "a red circle in the top left"
  latents = np.random.default_rng(0).standard_normal(
      (1, 4, sd1.latent_size, sd1.latent_size)).astype(np.float32)
  with torch.no_grad():
    theirs = pipe(prompt, latents=torch.from_numpy(latents), num_inference_steps=5,
                  guidance_scale=3.0, height=sd1.image_size, width=sd1.image_size,
                  output_type="np").images
  mesh = parallel.create_mesh({"data": 1}, devices=jax.local_devices()[:1])
  ours = sampling.generate(sd1, [prompt], num_steps=5, guidance_scale=3.0, sampler="ddim",
                           initial_latents=latents.transpose(0, 2, 3, 1), mesh=mesh,
                           output_type="float")
  err = float(np.max(np.abs(ours - theirs)))
  print(f"max abs pixel difference, diffusers vs ours: {err:.3g}")
  assert err <= IMAGE_ATOL
  assert 0.05 < theirs.std() and np.mean((theirs == 0) | (theirs == 1)) < 0.5  # a real image


def test_cli_converts_diffusers_to_single_file_and_native(sd1, sd1_diffusers, tmp_path):
  """Each source flag reads its kind; --model detects it."""
  from latent_diffusion_jax.interop.single_file import load_single_file
  lines = []
  single = str(tmp_path / "model.safetensors")
  written = export_cli.run(["export", "--diffusers", sd1_diffusers, "--format", "single-file",
                            "--out", single], print_fn=lines.append)
  assert written["checkpoint"] == single and os.path.isfile(written["config"])
  assert any(single in line for line in lines)
  assert f"Loaded diffusers:{sd1_diffusers}." in lines
  _assert_same_model(sd1, load_single_file(single))
  export_cli.run(["export", f"--single_file={single}", "--format=native",
                  f"--out={tmp_path / 'native'}", "--dtype=float32"], print_fn=lines.append)
  _assert_same_model(sd1, load_native(str(tmp_path / "native")))
  lines.clear()
  export_cli.run(["export", f"--model={tmp_path / 'native'}", "--format=diffusers",
                  f"--out={tmp_path / 'again'}"], print_fn=lines.append)
  assert f"Loaded native:{tmp_path / 'native'}." in lines
  _assert_same_model(sd1, load_pipeline(str(tmp_path / "again")))


def test_cli_refuses_pickles_without_the_flag(sd1, tmp_path):
  torch = pytest.importorskip("torch")
  from latent_diffusion_jax.interop.files import PickleRefusedError
  from latent_diffusion_jax.interop.single_file import export_single_file
  written = export_single_file(sd1, str(tmp_path / "model.safetensors"))
  with safe_open(written["checkpoint"], "np") as f:
    state_dict = {k: torch.from_numpy(f.get_tensor(k)) for k in f.keys()}
  ckpt = str(tmp_path / "model.ckpt")
  torch.save({"state_dict": state_dict, "global_step": 7}, ckpt)
  os.rename(written["config"], str(tmp_path / "model.yaml.bak"))
  args = ["export", "--single_file", ckpt, "--config_yaml", str(tmp_path / "model.yaml.bak"),
          "--tokenizer", written["tokenizer"], "--format", "native", "--out", str(tmp_path / "n")]
  with pytest.raises(PickleRefusedError, match="arbitrary code"):
    export_cli.run(args, print_fn=lambda _: None)
  export_cli.run(args + ["--allow_pickle"], print_fn=lambda _: None)
  _assert_same_model(sd1, load_native(str(tmp_path / "n")))


def test_cli_errors_are_messages_not_tracebacks(sd1_diffusers, tmp_path):
  """A bad source ends the command with `export: Type: message` and exit status 1; bad flags are
  usage errors."""
  from latent_diffusion_jax.core.errors import MissingInputError, UserInputError
  missing = str(tmp_path / "nope")
  result = subprocess.run(
      [sys.executable, "-m", "latent_diffusion_jax.cli.export", "--checkpoint", missing,
       "--format", "diffusers", "--out", str(tmp_path / "out")],
      capture_output=True, text=True, cwd=REPO, timeout=120)
  assert result.returncode == 1, result.stderr[-2000:]
  assert f"export: MissingInputError: No workdir at '{missing}'" in result.stderr
  assert "Traceback" not in result.stderr
  with pytest.raises(MissingInputError, match="nope"):
    export_cli.run(["export", "--checkpoint", missing, "--format", "native", "--out", "x"],
                   print_fn=lambda _: None)
  unet = os.path.join(sd1_diffusers, "unet")
  with pytest.raises(UserInputError, match="holds one diffusers_model network"):
    export_cli.run(["export", "--model", unet, "--format", "native", "--out", str(tmp_path / "n")],
                   print_fn=lambda _: None)
  with pytest.raises(MissingInputError, match="no unet/ subdirectory; is it a diffusers pipeline"):
    export_cli.run(["export", "--diffusers", unet, "--format", "native", "--out",
                    str(tmp_path / "n")], print_fn=lambda _: None)
  for argv, message in (
      (["--format", "zip", "--out", "x"], "should be one of"),
      (["--format", "native", "--out", "x"], "exactly one of --model, --checkpoint.*got none"),
      (["--native", "a", "--diffusers", "b", "--format", "native", "--out", "x"],
       "exactly one of .*got --diffusers, --native"),
      (["--from_diffusers", "b", "--format", "native", "--out", "x"], "from_diffusers"),
      (["--diffusers", sd1_diffusers, "--step", "3", "--format", "native", "--out", "x"],
       "--diffusers .*step only applies to training workdirs"),
      (["--diffusers", str(tmp_path), "--format", "native"], "--out are required")):
    with pytest.raises(export_cli.app.UsageError, match=message):
      export_cli.run(["export", *argv], print_fn=lambda _: None)
