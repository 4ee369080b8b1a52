"""Image-conditioned models: input errors, export/import round trips (diffusers, single file,
native), semantic-map sampling and sample.py's image flags end to end."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from latent_diffusion_jax import sampling
from latent_diffusion_jax.core import parallel
from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.models import image_conditioning as ic
from latent_diffusion_jax.sampling import image_conditioned as ics
from tiny_bundles import MAX_LENGTH, _init, assert_trees_equal, cached_bundle

PROMPTS = ["a red circle", "a blue square"]


def _with_unet(bundle, in_channels, conditioning, **unet_fields):
  unet = bundle.unet.clone(in_channels=in_channels, **unet_fields)
  f = bundle.vae.downsample_factor
  latent = jnp.zeros((1, bundle.image_size // f, bundle.image_size // f, in_channels))
  labels = (jnp.zeros((1,), jnp.int32),) if unet.num_class_embeds else ()
  params = _init(unet, latent, jnp.zeros((1,), jnp.int32),
                 jnp.zeros((1, MAX_LENGTH, unet.cross_attention_dim)), *labels, seed=7)
  return dataclasses.replace(bundle, unet=unet, unet_params=params,
                             image_conditioning=conditioning)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
  return cached_bundle("sd1", tmp_path_factory)


@pytest.fixture(scope="module")
def inpainting(sd1):
  return _with_unet(sd1, 9, ic.ImageConditioning("inpainting"))


@pytest.fixture(scope="module")
def upscaler(sd1):
  return _with_unet(sd1, 7, ic.ImageConditioning("upscaling", max_noise_level=300),
                    num_class_embeds=1000, only_cross_attention=(True, False))


@pytest.fixture(scope="module")
def semantic(sd1):
  return _with_unet(sd1, 4 + 3, ic.ImageConditioning("semantic", num_classes=3))


def _rgb(n, size, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_inputs_that_do_not_fit_are_named(sd1, inpainting, upscaler, semantic):
  init = _rgb(2, 16)
  mask = np.zeros((2, 16, 16), np.float32)
  cases = [
      (dict(bundle=sd1, init_image=_rgb(2, 14)), r"init_image is 14x14 pixels.*multiples of 4"),
      (dict(bundle=sd1, init_image=init, mask_image=np.zeros((2, 8, 8))),
       r"mask_image is 8x8 pixels but the image is 16x16"),
      (dict(bundle=sd1, init_image=init, mask_image=np.zeros((2, 16, 16, 3))),
       r"mask_image must be single-channel"),
      (dict(bundle=sd1, init_image=init, strength=0.0), r"strength must lie in \(0, 1\]"),
      (dict(bundle=sd1, init_image=init, strength=1.5), r"strength must lie in \(0, 1\]"),
      (dict(bundle=sd1, mask_image=mask), r"mask_image needs init_image"),
      (dict(bundle=sd1, low_res_image=_rgb(2, 8)), r"low_res_image needs an upscaling model"),
      (dict(bundle=sd1, semantic_map=np.zeros((2, 16, 16), np.int32)),
       r"semantic_map needs a model with concatenated segmentation-map channels"),
      (dict(bundle=inpainting, init_image=init), r"init_image alone .* give mask_image too"),
      (dict(bundle=upscaler, low_res_image=_rgb(2, 8), noise_level=301),
       r"noise_level must be an integer in \[0, 300\]"),
      (dict(bundle=upscaler, low_res_image=_rgb(2, 7)), r"low_res_image is 7x7 pixels"),
      (dict(bundle=upscaler, low_res_image=_rgb(2, 8, 1)[..., :1]),
       r"low_res_image must be \[N, H, W, 3\]"),
      (dict(bundle=semantic, semantic_map=np.full((2, 16, 16), 3)), r"class ids must lie in \[0, 3\)"),
      (dict(bundle=sd1, init_image=init, noise={"latents": np.zeros((2, 4, 4, 4))}),
       r"noise\['latents'\] must have shape \(2, 8, 8, 4\)"),
      (dict(bundle=sd1, init_image=init, noise={"low_res": np.zeros((2, 4, 4, 3))}),
       r"noise\['low_res'\] is not an input of img2img"),
      # A model whose UNet lacks the channels its conditioning needs.
      (dict(bundle=dataclasses.replace(sd1, image_conditioning=ic.ImageConditioning("inpainting")),
            init_image=init, mask_image=mask), r"takes 4 input channels, but inpainting"),
  ]
  for kwargs, pattern in cases:
    bundle = kwargs.pop("bundle")
    with pytest.raises(UserInputError, match=pattern):
      ics.generate_from_images(bundle, PROMPTS, num_steps=4, **kwargs)


def test_text_to_image_refuses_image_conditioned_models(inpainting):
  with pytest.raises(UserInputError, match="9 input channels"):
    sampling.generate(inpainting, PROMPTS, num_steps=2)


def test_conditioning_layout_helpers():
  labels = np.zeros((1, 4, 4), np.int32)
  labels[0, :2, :2] = 2
  labels[0, 0, 2] = 1
  maps = np.asarray(ic.semantic_map_channels(jnp.asarray(labels), 3, 2))
  assert maps.shape == (1, 2, 2, 3)
  np.testing.assert_allclose(maps[0, 0, 0], [0, 0, 1])
  np.testing.assert_allclose(maps[0, 0, 1], [0.75, 0.25, 0])
  mask = np.zeros((1, 4, 4, 1), np.float32)
  mask[0, 0, 0] = 0.6
  mask[0, 1, 1] = 1.0  # not a top-left pixel of a 2x2 cell: invisible at latent size
  small = np.asarray(ic.mask_at_latent_size(ic.binarize_mask(jnp.asarray(mask)), 2))
  np.testing.assert_array_equal(small[0, ..., 0], [[1, 0], [0, 0]])
  assert ic.infer(4, 4) is None and ic.infer(9, 4).kind == "inpainting"
  assert ic.infer(7, 4, upscaling=True).kind == "upscaling"
  with pytest.raises(UserInputError, match="5 input channels"):
    ic.infer(5, 4)
  cond = ic.ImageConditioning("upscaling")
  assert ic.ImageConditioning.from_dict(json.loads(json.dumps(cond.to_dict()))) == cond


def test_inpainting_round_trips_through_diffusers_and_single_file(inpainting, tmp_path):
  from latent_diffusion_jax.interop.diffusers import load_pipeline
  from latent_diffusion_jax.interop.export_diffusers import export_diffusers
  from latent_diffusion_jax.interop.single_file import export_single_file, load_single_file
  written = export_diffusers(inpainting, str(tmp_path / "dir"))
  with open(written["model_index"]) as f:
    assert json.load(f)["_class_name"] == "StableDiffusionInpaintPipeline"
  back = load_pipeline(str(tmp_path / "dir"))
  assert back.image_conditioning == inpainting.image_conditioning and back.unet.in_channels == 9
  assert_trees_equal(back.unet_params, inpainting.unet_params)
  export_single_file(inpainting, str(tmp_path / "m.safetensors"))
  with open(tmp_path / "m.yaml") as f:
    text = f.read()
  assert "LatentInpaintDiffusion" in text and "hybrid" in text
  os.remove(tmp_path / "m.yaml")  # the header config must do on its own, too
  single = load_single_file(str(tmp_path / "m.safetensors"))
  assert single.image_conditioning.kind == "inpainting" and single.unet.in_channels == 9
  assert_trees_equal(single.unet_params, inpainting.unet_params)


def test_single_file_inpainting_needs_the_inpainting_target(inpainting, tmp_path):
  """A 9-channel UNet under a text-to-image model.target is refused (a yaml that does not fit
  the weights), naming both."""
  import yaml
  from latent_diffusion_jax.interop.single_file import export_single_file, load_single_file
  path = str(tmp_path / "m.safetensors")
  export_single_file(inpainting, path)
  with open(tmp_path / "m.yaml") as f:
    original = yaml.safe_load(f)
  assert original["model"]["params"]["unet_config"]["params"]["in_channels"] == 9
  original["model"]["target"] = "ldm.models.diffusion.ddpm.LatentDiffusion"
  with open(tmp_path / "bad.yaml", "w") as f:
    yaml.safe_dump(original, f)
  with pytest.raises(UserInputError, match="9 input channels .* not LatentInpaintDiffusion"):
    load_single_file(path, config_yaml=str(tmp_path / "bad.yaml"))


def test_upscaler_round_trips_and_loads_in_diffusers(upscaler, tmp_path):
  from latent_diffusion_jax.interop.diffusers import load_pipeline
  from latent_diffusion_jax.interop.export_diffusers import ExportError, export_diffusers
  from latent_diffusion_jax.interop.single_file import export_single_file
  written = export_diffusers(upscaler, str(tmp_path / "dir"))
  back = load_pipeline(str(tmp_path / "dir"))
  assert back.image_conditioning == upscaler.image_conditioning
  assert back.image_conditioning.max_noise_level == 300
  assert back.unet.num_class_embeds == 1000
  diffusers = pytest.importorskip("diffusers")
  pipe = diffusers.StableDiffusionUpscalePipeline.from_pretrained(written["model_index"][:-17],
                                                                 local_files_only=True)
  assert pipe.config.max_noise_level == 300 and pipe.unet.config.in_channels == 7
  assert pipe.low_res_scheduler.config.beta_end == pytest.approx(0.02)
  with pytest.raises(ExportError, match="upscaling"):
    export_single_file(upscaler, str(tmp_path / "m.safetensors"))


def test_semantic_model_exports_natively_only(semantic, tmp_path):
  from latent_diffusion_jax.interop.export_diffusers import ExportError, export_diffusers
  from latent_diffusion_jax.interop.native import export_native, load_native
  with pytest.raises(ExportError, match="semantic"):
    export_diffusers(semantic, str(tmp_path / "dir"))
  export_native(semantic, str(tmp_path / "native"))
  back = load_native(str(tmp_path / "native"))
  assert back.image_conditioning == semantic.image_conditioning


@pytest.mark.slow
def test_semantic_map_sampling_runs_and_follows_the_map(semantic):
  mesh = parallel.create_mesh({"data": 1}, devices=jax.devices()[:1])
  maps = np.zeros((2, 16, 16), np.int32)
  maps[1, :, 8:] = 2
  out = ics.semantic_to_image(semantic, PROMPTS, maps, num_steps=2, guidance_scale=2.0,
                              mesh=mesh, output_type="float")
  assert out.shape == (2, 16, 16, 3) and np.isfinite(out).all()
  # Same prompts and seeds: only the map differs between the two rows' inputs; redo row 0 with
  # row 1's map to see that the map reaches the model.
  swapped = ics.semantic_to_image(semantic, PROMPTS, maps[::-1], num_steps=2,
                                  guidance_scale=2.0, mesh=mesh, output_type="float")
  assert np.abs(out[0] - swapped[0]).max() > 1e-3


@pytest.mark.slow
def test_sample_py_image_flags_end_to_end(sd1, tmp_path, monkeypatch):
  """--init_image/--mask_image through sample.py on a native export of a text-to-image model
  (inpainting by re-noising), and the flag errors."""
  from absl.testing import flagsaver
  from latent_diffusion_jax.interop.native import export_native
  from test_sampling import load_sample_cli
  cli = load_sample_cli()
  export_native(sd1, str(tmp_path / "model"))
  monkeypatch.setattr(sampling.generation, "default_mesh",
                      lambda: parallel.create_mesh({"data": 1}, devices=jax.devices()[:1]))
  Image.fromarray(_rgb(1, 16)[0]).save(tmp_path / "init.png")
  mask = np.zeros((16, 16), np.uint8)
  mask[4:12, 4:12] = 255
  Image.fromarray(mask).save(tmp_path / "mask.png")
  Image.fromarray(_rgb(1, 16)[0]).save(tmp_path / "rgb_mask.png")

  def run(*argv):
    with flagsaver.flagsaver():
      cli.flags.FLAGS(["sample.py", "--native", str(tmp_path / "model"), "--prompt",
                       "a red circle", "--steps", "2", *argv])
      cli.main(["sample.py"])

  out = tmp_path / "out"
  run("--init_image", str(tmp_path / "init.png"), "--mask_image", str(tmp_path / "mask.png"),
      "--out", str(out))
  with open(out / "settings.json") as f:
    settings = json.load(f)
  assert settings["mask_image"].endswith("mask.png") and settings["strength"] == 1.0
  assert np.asarray(Image.open(out / settings["files"][0])).shape == (16, 16, 3)
  with pytest.raises(SystemExit, match="mask_image .* single-channel"):
    run("--init_image", str(tmp_path / "init.png"), "--mask_image",
        str(tmp_path / "rgb_mask.png"), "--out", str(out))
  with pytest.raises(SystemExit, match=r"strength must lie in \(0, 1\]"):
    run("--init_image", str(tmp_path / "init.png"), "--strength", "1.5", "--out", str(out))
  with pytest.raises(SystemExit, match="--strength needs --init_image"):
    run("--strength", "0.5", "--out", str(out))


def test_x4_upscaler_unet_config_builds():
  """The stable-diffusion-x4-upscaler UNet config (its shape-relevant keys): 7 input channels,
  1000 noise-level classes, no self-attention in the three upper levels."""
  from latent_diffusion_jax.interop.diffusers_config import (unet_from_diffusers_config,
                                                             unet_to_diffusers_config)
  cfg = {
      "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
      "block_out_channels": [256, 512, 512, 1024], "center_input_sample": False,
      "class_embed_type": None, "cross_attention_dim": 1024,
      "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                           "CrossAttnDownBlock2D"],
      "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True,
      "freq_shift": 0, "in_channels": 7, "layers_per_block": 2, "mid_block_scale_factor": 1,
      "norm_eps": 1e-05, "norm_num_groups": 32, "num_class_embeds": 1000,
      "only_cross_attention": [True, True, True, False], "out_channels": 4,
      "resnet_time_scale_shift": "default", "sample_size": 128,
      "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                         "UpBlock2D"],
      "upcast_attention": False, "use_linear_projection": True,
  }
  unet = unet_from_diffusers_config(cfg)
  assert unet.in_channels == 7 and unet.num_class_embeds == 1000
  assert unet.only_cross_attention == (True, True, True, False)
  assert unet.attention_levels == (False, True, True, True)
  hash(unet)  # modules are cache keys of the sample functions
  back = unet_to_diffusers_config(unet, 128)
  assert back["only_cross_attention"] == [True, True, True, False]
  assert ic.infer(unet.in_channels, 4, upscaling=True).kind == "upscaling"


def test_image_input_files_are_read_and_checked(tmp_path):
  from latent_diffusion_jax.core.errors import InputFileError, MissingInputError
  labels = np.zeros((8, 8), np.uint8)
  labels[:, 4:] = 2
  Image.fromarray(labels).save(tmp_path / "map.png")
  Image.fromarray(_rgb(1, 8)[0]).save(tmp_path / "rgb.png")
  (tmp_path / "junk.png").write_bytes(b"not an image")
  arrays = sampling.ImageInputs(semantic_map=str(tmp_path / "map.png"),
                                low_res_image=str(tmp_path / "rgb.png"), noise_level=7).arrays()
  assert arrays["semantic_map"].dtype == np.int32 and arrays["semantic_map"].shape == (1, 8, 8)
  np.testing.assert_array_equal(arrays["semantic_map"][0], labels)
  assert arrays["low_res_image"].shape == (1, 8, 8, 3) and arrays["noise_level"] == 7
  with pytest.raises(InputFileError, match="--mask_image .* 3 channels; it must be a single-channel"):
    sampling.ImageInputs(init_image=str(tmp_path / "rgb.png"),
                         mask_image=str(tmp_path / "rgb.png")).arrays()
  with pytest.raises(InputFileError, match="--init_image .* not a readable image"):
    sampling.ImageInputs(init_image=str(tmp_path / "junk.png")).arrays()
  with pytest.raises(MissingInputError, match="--low_res_image .* no such file"):
    sampling.ImageInputs(low_res_image=str(tmp_path / "missing.png")).arrays()
  assert not sampling.ImageInputs().given
