"""Sampling with ControlNets: generate() equals diffusers' StableDiffusionControlNetPipeline for one
and two ControlNets (MultiControlNetModel) and in guess mode, sample.py's ControlNet flags, and the
messages for bad control input.

Compilation dominates: every sampling call here shares one setting (DDIM, 4 steps, guidance 3,
batch 2 on one device); each ControlNet count and guess mode compiles once.
"""

import json

import jax
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from latent_diffusion_jax import sampling  # noqa: E402
from latent_diffusion_jax.artifacts import loader  # noqa: E402
from latent_diffusion_jax.core import parallel  # noqa: E402
from latent_diffusion_jax.core.errors import (FlagError, MissingInputError,  # noqa: E402
                                              UserInputError)
from latent_diffusion_jax.data import tokenizers  # noqa: E402
from latent_diffusion_jax.interop.diffusers import load_pipeline  # noqa: E402
from latent_diffusion_jax.sampling import generation  # noqa: E402
from test_sampling import MAX_LENGTH, WORDS, _run_cli, load_sample_cli  # noqa: E402

PROMPTS = ["a red circle", "a blue square"]
KW = dict(num_steps=4, guidance_scale=3.0, sampler="ddim")
TOL = 2e-3  # on [0, 1] pixels


@pytest.fixture(scope="module")
def one_device():
  return parallel.create_mesh({"data": 1}, devices=jax.devices()[:1])


def _controlnet(unet, seed):
  """A ControlNet copied from `unet` (diffusers' from_unet) whose zero convs got small random
  weights, so that it changes the images; its hint encoder downsamples by 2 (the VAE's factor)."""
  torch.manual_seed(seed)
  net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in net.named_parameters():
      if name.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                          "controlnet_cond_embedding.conv_out")):
        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
  return net.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A tiny random SD pipeline directory, two ControlNet directories, and the torch pipelines."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # torch's pool fighting XLA's for 2 cores slows both
  torch.manual_seed(0)
  root = tmp_path_factory.mktemp("controlnet_pipeline")
  tok_dir = tokenizers.build_word_tokenizer(WORDS, str(root / "tokenizer"),
                                            model_max_length=MAX_LENGTH)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir)
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
  parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
               scheduler=scheduler)
  base = diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
  base.set_progress_bar_config(disable=True)
  base.save_pretrained(str(root / "sd"), safe_serialization=True)
  nets = [_controlnet(unet, seed) for seed in (1, 2)]
  for i, net in enumerate(nets):
    net.save_pretrained(str(root / f"cn{i}"), safe_serialization=True)
  diffusers.StableDiffusionControlNetPipeline(
      **parts, controlnet=nets[0], safety_checker=None, feature_extractor=None,
      requires_safety_checker=False).save_pretrained(str(root / "cn_pipeline"),
                                                     safe_serialization=True)

  def pipeline(controlnet):
    pipe = diffusers.StableDiffusionControlNetPipeline(
        **parts, controlnet=controlnet, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe

  rng = np.random.default_rng(0)
  images = [rng.uniform(size=(16, 16, 3)).astype(np.float32),
            (rng.uniform(size=(2, 16, 16, 3)) > 0.5).astype(np.float32)]
  yield dict(root=root, pipeline=pipeline, base=base, nets=nets, images=images,
             bundle=load_pipeline(str(root / "sd")),
             latents=rng.standard_normal((2, 8, 8, 4)).astype(np.float32))
  torch.set_num_threads(threads)


def _ours(setup, mesh, count, scales, guess_mode=False, **kw):
  controls = []
  for i in range(count):
    net = loader.load_controlnet(str(setup["root"] / f"cn{i}"), base_unet=setup["bundle"].unet)
    controls.append(sampling.Control(net.module, net.params, setup["images"][i], scales[i]))
  return sampling.generate(setup["bundle"], PROMPTS, **KW, initial_latents=setup["latents"],
                           output_type="float", mesh=mesh, controlnets=controls,
                           guess_mode=guess_mode, **kw)


def _theirs(setup, count, scales, guess_mode=False):
  nets = setup["nets"][:count]
  controlnet = nets[0] if count == 1 else diffusers.MultiControlNetModel(nets)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(  # noqa: E731
      np.reshape(a, (-1, *a.shape[-3:])).transpose(0, 3, 1, 2)))
  images = [nchw(a) for a in setup["images"][:count]]
  with torch.no_grad():
    return setup["pipeline"](controlnet)(
        prompt=PROMPTS, image=images[0] if count == 1 else images,
        controlnet_conditioning_scale=scales[0] if count == 1 else list(scales[:count]),
        guess_mode=guess_mode, num_inference_steps=KW["num_steps"],
        guidance_scale=KW["guidance_scale"], output_type="np",
        latents=torch.from_numpy(setup["latents"].transpose(0, 3, 1, 2))).images


@pytest.mark.parity
@pytest.mark.parametrize("count,scales,guess_mode", [
    (1, (0.8,), False), (2, (0.8, 0.5), False), (2, (1.0, 0.7), True)])
def test_generate_matches_controlnet_pipeline(setup, one_device, count, scales, guess_mode):
  ours = _ours(setup, one_device, count, scales, guess_mode)
  ref = _theirs(setup, count, scales, guess_mode)
  err = np.abs(ours - ref).max()
  print(f"{count} ControlNet(s), guess_mode={guess_mode}: max abs diff on [0, 1] pixels {err:.3g}")
  assert err <= TOL, err
  assert ((ref > 0.02) & (ref < 0.98)).mean() > 0.5 and ref.std() > 0.01
  # Control matters: without it the same pipeline gives clearly other pixels.
  with torch.no_grad():
    plain = setup["base"](prompt=PROMPTS, num_inference_steps=KW["num_steps"],
                          guidance_scale=KW["guidance_scale"], output_type="np",
                          latents=torch.from_numpy(setup["latents"].transpose(0, 3, 1, 2))).images
  assert np.abs(plain - ref).max() > 50 * TOL


@pytest.mark.slow
def test_sample_py_with_controlnets(setup, one_device, tmp_path, monkeypatch):
  """Two --controlnet flags paired with their images and scales give generate()'s pixels, and
  settings.json records them."""
  # One device: shares its compilation with the parity test of two ControlNets.
  monkeypatch.setattr(generation, "default_mesh", lambda: one_device)
  root = setup["root"]
  files = []
  for i, image in enumerate(setup["images"]):
    files.append(str(tmp_path / f"control{i}.png"))
    Image.fromarray((np.reshape(image, (-1, 16, 16, 3))[0] * 255).round().astype(np.uint8)).save(
        files[-1])
  out = tmp_path / "out"
  _run_cli(load_sample_cli(), [
      "--diffusers", str(root / "sd"), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
      "--steps", "4", "--guidance_scale", "3", "--seed", "5", "--out", str(out),
      "--controlnet", str(root / "cn0"), "--control_image", files[0],
      "--controlnet", str(root / "cn1"), "--control_image", files[1],
      "--control_scale", "0.8", "--control_scale", "0.5"])
  with open(out / "settings.json") as f:
    settings = json.load(f)
  assert settings["controlnets"] == [
      {"source": f"diffusers_model:{root / 'cn0'}", "image": files[0], "scale": 0.8},
      {"source": f"diffusers_model:{root / 'cn1'}", "image": files[1], "scale": 0.5}]
  assert settings["guess_mode"] is False
  controls = []
  for i in range(2):
    net = loader.load_controlnet(str(root / f"cn{i}"))
    controls.append(sampling.Control(net.module, net.params, np.asarray(Image.open(files[i])),
                                     (0.8, 0.5)[i]))
  expected = sampling.generate(setup["bundle"], PROMPTS, **KW, seed=5, mesh=one_device,
                               controlnets=controls)
  for i, name in enumerate(settings["files"]):
    np.testing.assert_array_equal(np.asarray(Image.open(out / name)), expected[i])


def test_control_input_errors(setup, tmp_path):
  bundle, root = setup["bundle"], setup["root"]
  net = loader.load_controlnet(str(root / "cn0"), base_unet=bundle.unet)
  control = sampling.Control(net.module, net.params, setup["images"][0])
  def run(*controls, **kw):
    return sampling.generate(bundle, PROMPTS, **KW, controlnets=controls, **kw)
  with pytest.raises(UserInputError, match=r"Control image 1 is 16x16 pixels .* sampled at 32x16"):
    run(control, width=32)
  with pytest.raises(UserInputError, match=r"Control image 1 has shape \(16, 16, 1\)"):
    run(control._replace(image=np.zeros((16, 16, 1), np.float32)))
  with pytest.raises(UserInputError, match="3 images for 2 prompts"):
    run(control._replace(image=np.zeros((3, 16, 16, 3), np.float32)))
  # Layout mismatch: the ControlNet of another UNet, named by the field.
  wider = bundle.unet.clone(block_out_channels=(32, 64))
  with pytest.raises(UserInputError, match=r"ControlNet 1 does not fit the base UNet: "
                     r"block_out_channels \(16, 32\) vs the base UNet's \(32, 64\)"):
    sampling.controlnet.prepare([control], wider, 2, 16, 16)
  with pytest.raises(UserInputError, match="block_out_channels"):
    loader.load_controlnet(str(root / "cn0"), base_unet=wider)
  coarser = control._replace(
      controlnet=net.module.clone(conditioning_embedding_out_channels=(8, 8, 16)))
  with pytest.raises(UserInputError, match="downsamples control images by 4, the first stage by 2"):
    run(coarser)
  # A single file records no layout: without the base model it cannot load.
  from latent_diffusion_jax.interop.controlnet import export_controlnet_single_file
  single = export_controlnet_single_file(net.module, net.params, str(tmp_path / "cn.safetensors"))
  with pytest.raises(MissingInputError, match="give the base model"):
    loader.load_controlnet(single)
  assert loader.load_controlnet(single, base_unet=bundle.unet).module == net.module
  with pytest.raises(UserInputError, match="holds a ControlNet"):
    loader.load_networks(str(root / "cn0"), ["unet"])
  # Flags: pairing, and a ControlNet without its base model.
  with pytest.raises(FlagError, match="2 --controlnet and 1 --control_image"):
    sampling.controlnet.pair_flags(["a", "b"], ["x"], [])
  with pytest.raises(FlagError, match="3 --control_scale for 2 --controlnet"):
    sampling.controlnet.pair_flags(["a", "b"], ["x", "y"], [1, 2, 3])
  paired = sampling.controlnet.pair_flags(["a", "b"], ["x", "y"], [0.5])
  assert [s.scale for s in paired] == [0.5] * 2
  with pytest.raises(SystemExit, match="sample.py: FlagError: --controlnet needs the base model"):
    _run_cli(load_sample_cli(), ["--prompt", "a red circle", "--controlnet", str(root / "cn0"),
                                 "--control_image", "x.png", "--out", str(tmp_path)])
  with pytest.raises(MissingInputError, match="No control image at"):
    sampling.controlnet.read_control_image(str(tmp_path / "missing.png"), 3)


def test_controlnet_pipeline_directory_is_a_source(setup):
  """A StableDiffusionControlNetPipeline directory is both a base model and a ControlNet."""
  root = setup["root"]
  from_pipeline = loader.load_controlnet(str(root / "cn_pipeline"))
  alone = loader.load_controlnet(str(root / "cn0"))
  assert from_pipeline.module == alone.module
  for a, b in zip(jax.tree.leaves(from_pipeline.params), jax.tree.leaves(alone.params)):
    np.testing.assert_array_equal(a, b)
  bundle = loader.load_bundle(str(root / "cn_pipeline"))
  assert bundle.unet == setup["bundle"].unet
  with pytest.raises(UserInputError, match="no controlnet/ subdirectory"):
    loader.load_controlnet(str(root / "sd"))


@pytest.mark.slow
def test_stochastic_sampler_with_control(setup, one_device):
  """DDPM draws noise per image (a vmap over the batch); the control images ride along: at scale 0
  the images are the uncontrolled ones, at 0.8 they are not."""
  net = loader.load_controlnet(str(setup["root"] / "cn0"))
  kw = dict(KW, sampler="ddpm", seed=3, mesh=one_device, output_type="float")
  plain = sampling.generate(setup["bundle"], PROMPTS, **kw)
  images = setup["images"][1]  # one per prompt
  zero, full = (sampling.generate(setup["bundle"], PROMPTS, **kw, controlnets=[
      sampling.Control(net.module, net.params, images, scale)]) for scale in (0.0, 0.8))
  np.testing.assert_allclose(zero, plain, atol=1e-5)
  assert np.abs(full - plain).max() > 0.05
