"""Sampling: generate() on a tiny model, batching and device independence, compile-once, PNG
writing, sample.py end to end, and parity with diffusers' StableDiffusionPipeline.

Compilation dominates the run time, so tests share a few (batch shape, settings) combinations:
DDIM with 3 steps and guidance 3 at batch 1 and 4 on one device and batch 8 on the 8-device mesh.
"""

import dataclasses
import importlib.util
import json
import os
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from latent_diffusion_jax.core import images as images_lib
from latent_diffusion_jax.core import parallel
from latent_diffusion_jax import sampling
from latent_diffusion_jax.data import tokenizers
from latent_diffusion_jax.models.autoencoder import AutoencoderKL
from latent_diffusion_jax.models.bundle import ModelBundle
from latent_diffusion_jax.models.text_encoders import CLIPTextModel
from latent_diffusion_jax.models.unet import UNet2DConditionModel

WORDS = "a an red green blue circle square triangle big small on left right".split()
MAX_LENGTH = 8
SD_DIFFUSION = dict(schedule="scaled_linear", num_timesteps=1000, beta_start=0.00085,
                    beta_end=0.012, rescale_zero_terminal_snr=False, prediction_type="epsilon")
PROMPTS = ["a red circle", "a blue square", "a big green triangle", "a small red square"]
# The shared settings: one compilation per batch shape serves most tests.
KW = dict(num_steps=3, guidance_scale=3.0, sampler="ddim")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_params(module, *args):
  """Random params shaped as module.init makes them.

  Filled from numpy: jax.jit(module.init) spends most of a minute compiling the random
  initializers of even a tiny UNet on a shared 2-core CPU.
  """
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if leaf.ndim == 1:
      base = 1.0 if name.endswith("['scale']") else 0.0
      return (base + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(shapes))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  return tokenizers.build_word_tokenizer(WORDS, str(tmp_path_factory.mktemp("tokenizer")),
                                         model_max_length=MAX_LENGTH)


def make_tiny_bundle(tokenizer_dir: str) -> ModelBundle:
  """A text-to-image bundle of 16x16 images with random weights."""
  tok = tokenizers.load_tokenizer(tokenizer_dir)
  # One level with cross-attention and no mid-block attention: attention layers dominate the
  # compile time, and one is enough for prompts to matter.
  unet = UNet2DConditionModel(block_out_channels=(16,), attention_levels=(True,),
                              layers_per_block=1, num_heads=2, cross_attention_dim=16,
                              mid_block_attention=False, norm_num_groups=8)
  vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                      mid_block_attention=False)
  text = CLIPTextModel(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                       num_hidden_layers=1, num_attention_heads=2,
                       max_position_embeddings=MAX_LENGTH, eos_token_id=tok.eos_token_id)
  return ModelBundle(
      unet=unet, unet_params=_random_params(unet, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32),
                                            jnp.zeros((1, MAX_LENGTH, 16))),
      vae=vae, vae_params=_random_params(vae, jnp.zeros((1, 16, 16, 3))),
      text_encoder=text, text_encoder_params=_random_params(text, jnp.zeros((1, MAX_LENGTH), jnp.int32)),
      tokenizer_path=tokenizer_dir, scaling_factor=0.5, diffusion=dict(SD_DIFFUSION),
      image_size=16, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def bundle(tokenizer_dir):
  return make_tiny_bundle(tokenizer_dir)


@pytest.fixture(scope="module")
def one_device():
  return parallel.create_mesh({"data": 1}, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def batch1_images(bundle, one_device):
  return sampling.generate(bundle, PROMPTS, batch_size=1, mesh=one_device, output_type="float", **KW)


def test_generate_returns_uint8_images(bundle, one_device, batch1_images):
  images = sampling.generate(bundle, PROMPTS, batch_size=4, mesh=one_device, **KW)
  assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
  assert images.std() > 5  # not a constant image
  np.testing.assert_array_equal(images, sampling.to_uint8(batch1_images * 2 - 1))
  assert batch1_images.dtype == np.float32
  assert 0.0 <= batch1_images.min() and batch1_images.max() <= 1.0
  assert np.all(np.isfinite(batch1_images))


def test_images_do_not_depend_on_batch_size_or_device_count(bundle, one_device, batch1_images):
  batch4 = sampling.generate(bundle, PROMPTS, batch_size=4, mesh=one_device, output_type="float",
                             **KW)
  assert jax.device_count() == 8
  mesh8 = sampling.generate(bundle, PROMPTS, output_type="float", **KW)  # all 8 devices, padded
  np.testing.assert_allclose(batch4, batch1_images, atol=1e-5, rtol=0)
  np.testing.assert_allclose(mesh8, batch1_images, atol=1e-5, rtol=0)
  # Image i is image i of a longer list too.
  longer = sampling.generate(bundle, PROMPTS + ["a circle"], output_type="float", **KW)
  np.testing.assert_allclose(longer[:4], batch1_images, atol=1e-5, rtol=0)
  # And a list sampled in parts with first_index gives the images of one call (evaluation shards).
  tail = sampling.generate(bundle, PROMPTS[2:], first_index=2, output_type="float", **KW)
  np.testing.assert_allclose(tail, batch1_images[2:], atol=1e-5, rtol=0)


def test_seed_determinism(bundle):
  first = sampling.generate(bundle, PROMPTS, seed=7, **KW)
  np.testing.assert_array_equal(first, sampling.generate(bundle, PROMPTS, seed=7, **KW))
  other = sampling.generate(bundle, PROMPTS, seed=8, **KW)
  assert np.abs(first.astype(int) - other).mean() > 1


def test_guidance_and_negative_prompt_change_images(bundle, one_device):
  kw = dict(batch_size=4, mesh=one_device, output_type="float")
  guided = sampling.generate(bundle, PROMPTS, **kw, **KW)
  unguided = sampling.generate(bundle, PROMPTS, **kw, **{**KW, "guidance_scale": 1.0})
  assert not sampling.make_sample_fn(bundle, num_steps=3, guidance_scale=1.0).guided
  assert np.abs(guided - unguided).max() > 1e-2
  negative = sampling.generate(bundle, PROMPTS, negative_prompt="a green triangle", **kw, **KW)
  assert np.abs(guided - negative).max() > 1e-2


def test_compiles_once_across_batches_and_calls(bundle, one_device):
  sample_fn = sampling.make_sample_fn(bundle, **KW)
  assert sampling.make_sample_fn(bundle, **KW) is sample_fn  # cached per model and settings
  before = sample_fn.num_traces
  # Six prompts at batch 4: two batches, the second padded to the same shape.
  six = PROMPTS + ["a circle", "a square"]
  sampling.generate(bundle, six, batch_size=4, mesh=one_device, **KW)
  assert sample_fn.num_traces - before <= 1
  traced = sample_fn.num_traces
  sampling.generate(bundle, six[::-1], seed=3, negative_prompt="red", batch_size=4,
                    mesh=one_device, **KW)
  assert sample_fn.num_traces == traced


def test_stochastic_sampler_rows_do_not_interact(bundle):
  # Each row of a batch only depends on its own inputs, its ancestral noise included: permuting
  # the rows permutes the images. (A batch-wide noise draw would fail this.)
  # Unguided: a smaller program to compile, and guidance is not what this test is about.
  sample_fn = sampling.make_sample_fn(bundle, sampler="ddpm", num_steps=3, guidance_scale=1.0)
  cond = tokenizers.tokenize(tokenizers.load_tokenizer(bundle.tokenizer_path), PROMPTS, MAX_LENGTH)
  uncond = None
  latents, keys = sampling.image_noise(0, jnp.arange(4), sampling.latent_shape(bundle))
  params = sampling.bundle_params(bundle)
  images = np.asarray(sample_fn(params, cond, uncond, latents, keys))
  perm = np.array([2, 0, 3, 1])
  permuted = np.asarray(sample_fn(params, cond[perm], uncond, latents[perm], keys[perm]))
  np.testing.assert_allclose(permuted, images[perm], atol=1e-5, rtol=0)
  # The noise matters: other keys give other images.
  other = np.asarray(sample_fn(params, cond, uncond, latents, keys[::-1]))
  assert np.abs(other - images).max() > 1e-2
  assert sample_fn.num_traces == 1


def test_input_errors(bundle):
  with pytest.raises(ValueError, match="Unknown sampler 'euler'.*ddpm, ddim, dpmpp_2m"):
    sampling.generate(bundle, PROMPTS, sampler="euler")
  with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
    sampling.generate(bundle, PROMPTS, num_steps=0)
  with pytest.raises(ValueError, match="more than max_length=8"):
    sampling.generate(bundle, ["a big red circle on a small blue square"], **KW)
  with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
    sampling.generate(bundle, ["a purple circle"], **KW)
  with pytest.raises(ValueError, match="eta is a DDIM option"):
    sampling.generate(bundle, PROMPTS, sampler="ddpm", eta=0.5)
  with pytest.raises(ValueError, match="no tokenizer"):
    sampling.generate(dataclasses.replace(bundle, tokenizer_path=None), PROMPTS, **KW)
  with pytest.raises(ValueError, match="initial_latents must have shape"):
    sampling.generate(bundle, PROMPTS, initial_latents=np.zeros((4, 4, 4, 4)), **KW)
  with pytest.raises(ValueError, match="not class_labels"):
    sampling.generate(bundle, PROMPTS, class_labels=[0, 1, 2, 3], **KW)
  text_free = dataclasses.replace(
      bundle, unet=dataclasses.replace(bundle.unet, num_class_embeds=3), text_encoder=None,
      text_encoder_params=None, tokenizer_path=None)
  with pytest.raises(ValueError, match="pass class_labels"):
    sampling.generate(text_free, ["", ""], **KW)
  with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 3\)"):
    sampling.generate(text_free, ["", ""], class_labels=[0, 3], **KW)


def test_make_grid_is_near_square_with_padding():
  images = np.zeros((5, 4, 6, 3), np.uint8)
  grid = images_lib.make_grid(images, padding=1)
  assert grid.shape == (2 * 5 + 1, 3 * 7 + 1, 3)  # 3 columns, 2 rows
  assert grid[0].min() == 255 and grid[1, 1].max() == 0
  assert images_lib.make_grid(images, ncols=5, padding=0).shape == (4, 30, 3)


def test_save_images_writes_pngs_grid_and_settings(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
  prompts = ["A red circle!", "a blue square", ""]
  saved = images_lib.save_images(images, str(tmp_path / "out"), prompts,
                                 {"seed": 3, "sampler": "ddim", "source": "test"})
  assert [os.path.basename(p) for p in saved.images] == [
      "0000-a-red-circle.png", "0001-a-blue-square.png", "0002-image.png"]
  for path, image in zip(saved.images, images):
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
  assert np.asarray(Image.open(saved.grid)).shape == (2 * 10 + 2, 2 * 10 + 2, 3)
  with open(saved.settings) as f:
    settings = json.load(f)
  assert settings["seed"] == 3 and settings["source"] == "test"
  assert settings["prompts"] == prompts
  assert settings["files"] == [os.path.basename(p) for p in saved.images]


# --- diffusers pipeline directory: sample.py end to end and parity --------------------------


@pytest.fixture(scope="module")
def diffusers_pipeline(tmp_path_factory, tokenizer_dir):
  """A tiny random StableDiffusionPipeline, saved as a diffusers directory."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  # Torch's thread pool fighting XLA's for 2 cores makes the tiny reference run 100x slower.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
  text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
      num_attention_heads=2, max_position_embeddings=MAX_LENGTH,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id)).eval()
  unet = diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
      attention_head_dim=8, norm_num_groups=8).eval()
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
      latent_channels=4, norm_num_groups=4, sample_size=16).eval()
  scheduler = diffusers.DDIMScheduler(
      beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
      set_alpha_to_one=False, steps_offset=1)
  pipe = diffusers.StableDiffusionPipeline(
      vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  directory = str(tmp_path_factory.mktemp("sd_pipeline"))
  pipe.save_pretrained(directory, safe_serialization=True)
  yield pipe, directory
  torch.set_num_threads(threads)


def load_sample_cli():
  """sample.py as a module, loaded once per process (its absl flags can be defined only once;
  tests/test_buckets.py runs it too)."""
  if "sample_cli" not in sys.modules:
    spec = importlib.util.spec_from_file_location("sample_cli", os.path.join(REPO, "sample.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["sample_cli"] = module
  return sys.modules["sample_cli"]


@pytest.fixture(scope="module")
def sample_cli():
  return load_sample_cli()


def _run_cli(sample_cli, argv):
  from absl.testing import flagsaver
  with flagsaver.flagsaver():
    sample_cli.flags.FLAGS(["sample.py", *argv])
    sample_cli.main(["sample.py"])


def test_sample_py_end_to_end(diffusers_pipeline, sample_cli, one_device, tmp_path, capsys,
                              monkeypatch):
  _, directory = diffusers_pipeline
  # One device: shares its compilation with the parity test (sharding is tested above).
  monkeypatch.setattr(sampling, "default_mesh", lambda: one_device)
  prompts_file = tmp_path / "prompts.txt"
  prompts_file.write_text("# shapes\na blue square\n\n")
  out = tmp_path / "samples"
  _run_cli(sample_cli, ["--diffusers", directory, "--prompt", "a red circle", "--prompts_file",
                        str(prompts_file), "--steps", "5", "--guidance_scale", "3",
                        "--num_images_per_prompt", "2", "--seed", "1", "--out", str(out)])
  printed = capsys.readouterr().out
  assert "batch 1/1: 4 images" in printed and "images/s" in printed
  with open(out / "settings.json") as f:
    settings = json.load(f)
  assert settings["prompts"] == ["a red circle"] * 2 + ["a blue square"] * 2
  assert (settings["seed"], settings["num_steps"], settings["sampler"]) == (1, 5, "ddim")
  assert settings["guidance_scale"] == 3.0 and settings["source"] == f"diffusers:{directory}"
  for name in settings["files"] + ["grid.png"]:
    assert (out / name).is_file(), name
  assert np.asarray(Image.open(out / settings["files"][0])).shape == (16, 16, 3)


def test_sample_py_reads_single_file_and_native_exports(diffusers_pipeline, sample_cli, one_device,
                                                       tmp_path, monkeypatch):
  """The same weights as a single file and as a native export sample the same pixels as the
  diffusers directory they were converted from."""
  from latent_diffusion_jax.interop.diffusers import load_pipeline
  from latent_diffusion_jax.interop.native import export_native
  from latent_diffusion_jax.interop.single_file import export_single_file
  _, directory = diffusers_pipeline
  monkeypatch.setattr(sampling, "default_mesh", lambda: one_device)
  bundle = load_pipeline(directory)
  single = str(tmp_path / "model.safetensors")
  export_single_file(bundle, single)
  export_native(bundle, str(tmp_path / "native"))
  pixels = {}
  for flag, source in (("--diffusers", directory), ("--single_file", single),
                       ("--native", str(tmp_path / "native"))):
    out = tmp_path / flag.strip("-")
    _run_cli(sample_cli, [flag, source, "--prompt", "a red circle", "--steps", "3", "--seed", "2",
                          "--out", str(out)])
    with open(out / "settings.json") as f:
      settings = json.load(f)
    assert settings["source"] == f"{flag.strip('-')}:{source}"
    pixels[flag] = np.asarray(Image.open(out / settings["files"][0]))
  np.testing.assert_array_equal(pixels["--single_file"], pixels["--diffusers"])
  np.testing.assert_array_equal(pixels["--native"], pixels["--diffusers"])


def test_sample_py_names_the_missing_flags(sample_cli, tmp_path):
  """Source problems end sample.py with `sample.py: Type: message` (exit status 1, no traceback);
  the library raises the UserError family."""
  from absl import app
  from latent_diffusion_jax.core.errors import MissingInputError, UserInputError
  with pytest.raises(SystemExit, match="sample.py: FlagError: Give the model with exactly one "
                     "of --model, --checkpoint, --diffusers, --single_file, --native; got none"):
    _run_cli(sample_cli, ["--prompt", "a red circle", "--out", str(tmp_path)])
  with pytest.raises(SystemExit, match="exactly one of .*got --diffusers, --native"):
    _run_cli(sample_cli, ["--prompt", "a red circle", "--diffusers", str(tmp_path), "--native",
                          str(tmp_path), "--out", str(tmp_path)])
  with pytest.raises(SystemExit, match="sample.py: MissingInputError: .*" + re.escape(str(tmp_path / "nothing"))):
    _run_cli(sample_cli, ["--prompt", "a red circle", "--model", str(tmp_path / "nothing"),
                          "--out", str(tmp_path)])
  with pytest.raises(SystemExit, match=f"UserInputError: --model {re.escape(str(tmp_path))}: .* is none of"):
    _run_cli(sample_cli, ["--prompt", "a red circle", "--model", str(tmp_path), "--out",
                          str(tmp_path)])
  with pytest.raises(app.UsageError, match="No prompts"):
    _run_cli(sample_cli, ["--diffusers", str(tmp_path), "--out", str(tmp_path)])
  with pytest.raises(MissingInputError, match="nothing"):
    sampling.run_sampling(prompts=["a red circle"], out_dir=str(tmp_path),
                          source=str(tmp_path / "nothing"))
  with pytest.raises(UserInputError, match="--prompt"):
    sampling.run_sampling(prompts=[], out_dir=str(tmp_path), source=str(tmp_path))


@pytest.mark.parity
def test_generate_matches_diffusers_pipeline(diffusers_pipeline, one_device):
  import torch
  from latent_diffusion_jax.interop.diffusers import load_pipeline
  pipe, directory = diffusers_pipeline
  bundle = load_pipeline(directory)
  prompts = ["a red circle", "a blue square", "a red circle", "a blue square"]
  latents = np.random.default_rng(0).standard_normal((4, 8, 8, 4)).astype(np.float32)
  ours = sampling.generate(bundle, prompts, num_steps=5, guidance_scale=3.0, sampler="ddim",
                           initial_latents=latents, output_type="float", mesh=one_device)
  with torch.no_grad():
    ref = pipe(prompt=prompts, num_inference_steps=5, guidance_scale=3.0, output_type="np",
               latents=torch.from_numpy(latents.transpose(0, 3, 1, 2))).images
  err = np.abs(ours - ref).max()
  print(f"parity max abs diff on [0, 1] pixels: {err:.3g}")
  assert err <= 2e-3, err
  # The comparison covers real image content, not two saturated images.
  assert ((ref > 0.02) & (ref < 0.98)).mean() > 0.5 and ref.std() > 0.01
