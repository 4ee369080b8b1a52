"""Image-conditioned sampling (sampling/image_conditioned.py) against diffusers' pipelines on tiny
random models: StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline (9-channel UNet and
a plain 4-channel one) and StableDiffusionUpscalePipeline, each loaded from a saved pipeline
directory, given the same latents and noise. Tolerance: <= 2e-3 on [0, 1] pixels.

The torch pipelines draw their noise from one generator in a fixed order (posterior samples of
the VAE encodings and the initial latents); the tests draw the same tensors from the same seed
and pass them to ours through `noise`.
"""


import numpy as np
import pytest

from latent_diffusion_jax.core import parallel
from latent_diffusion_jax.data import tokenizers
from latent_diffusion_jax.sampling import image_conditioned as ics

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from torch_reference import randomize  # noqa: E402

WORDS = "a an red green blue circle square triangle big small on left right".split()
MAX_LENGTH = 8
PROMPTS = ["a red circle", "a blue square"]
STEPS = 4
TOL = 2e-3


@pytest.fixture(scope="module")
def one_device():
  import jax
  return parallel.create_mesh({"data": 1}, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
  """Tokenizer and text encoder shared by every pipeline."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # torch's and XLA's thread pools fighting over 2 cores is 100x slower
  tok_dir = tokenizers.build_word_tokenizer(WORDS, str(tmp_path_factory.mktemp("tok")),
                                            model_max_length=MAX_LENGTH)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir)
  torch.manual_seed(0)
  text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
      num_attention_heads=2, max_position_embeddings=MAX_LENGTH,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id)).eval()
  yield tokenizer, text_encoder
  torch.set_num_threads(threads)


def _unet(in_channels, seed, **kw):
  return randomize(diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1,
      block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
      attention_head_dim=8, norm_num_groups=8, **kw), seed=seed)


def _vae(levels, seed, scaling_factor=0.5):
  chans = (8, 16, 16)[:levels]
  return randomize(diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, block_out_channels=chans, layers_per_block=1,
      down_block_types=("DownEncoderBlock2D",) * levels,
      up_block_types=("UpDecoderBlock2D",) * levels, latent_channels=4, norm_num_groups=4,
      sample_size=16, scaling_factor=scaling_factor), seed=seed, scale=0.15)


def _ddim(**kw):
  return diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, **kw)


def _save(pipe, tmp_path_factory, name):
  pipe.set_progress_bar_config(disable=True)
  directory = str(tmp_path_factory.mktemp(name))
  pipe.save_pretrained(directory, safe_serialization=True)
  return directory


@pytest.fixture(scope="module")
def sd_pipeline(parts, tmp_path_factory):
  tokenizer, text_encoder = parts
  pipe = diffusers.StableDiffusionImg2ImgPipeline(
      vae=_vae(2, 1), text_encoder=text_encoder, tokenizer=tokenizer, unet=_unet(4, 2),
      scheduler=_ddim(), safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  return pipe, _save(pipe, tmp_path_factory, "img2img")


@pytest.fixture(scope="module")
def inpaint_pipeline(parts, tmp_path_factory):
  tokenizer, text_encoder = parts
  pipe = diffusers.StableDiffusionInpaintPipeline(
      vae=_vae(2, 3), text_encoder=text_encoder, tokenizer=tokenizer, unet=_unet(9, 4),
      scheduler=_ddim(), safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  return pipe, _save(pipe, tmp_path_factory, "inpaint")


@pytest.fixture(scope="module")
def upscale_pipeline(parts, tmp_path_factory):
  tokenizer, text_encoder = parts
  low_res = diffusers.DDPMScheduler(beta_start=0.0001, beta_end=0.02,
                                    beta_schedule="scaled_linear")
  pipe = diffusers.StableDiffusionUpscalePipeline(
      vae=_vae(3, 5, scaling_factor=0.08333), text_encoder=text_encoder, tokenizer=tokenizer,
      unet=_unet(7, 6, num_class_embeds=1000, only_cross_attention=[True, False]),
      low_res_scheduler=low_res,
      scheduler=_ddim(prediction_type="v_prediction"), max_noise_level=350)
  return pipe, _save(pipe, tmp_path_factory, "upscale")


def _images(seed, n, size, channels=3):
  return np.random.default_rng(seed).uniform(0, 1, (n, size, size, channels)).astype(np.float32)


def _nhwc(t):
  return t.numpy().transpose(0, 2, 3, 1)


def _check(ours, ref, other_noise=None):
  """Parity within TOL on images with content; `other_noise` (ours with our own seeded noise)
  must differ, or the comparison would not show that the noise paths agree."""
  err = np.abs(ours - ref).max()
  print(f"parity max abs diff on [0, 1] pixels: {err:.3g}")
  assert err <= TOL, err
  assert ref.std() > 0.02 and ((ref > 0.02) & (ref < 0.98)).mean() > 0.5
  if other_noise is not None:
    assert np.abs(other_noise - ref).max() > 0.05


@pytest.mark.parity
def test_image_to_image_matches_diffusers(sd_pipeline, one_device):
  from latent_diffusion_jax.interop.diffusers import load_pipeline
  pipe, directory = sd_pipeline
  bundle = load_pipeline(directory)
  assert bundle.image_conditioning is None
  init = _images(0, 2, 16)
  g = torch.Generator().manual_seed(0)
  posterior = torch.randn((2, 4, 8, 8), generator=g)  # the VAE encoding's sample
  noise = torch.randn((2, 4, 8, 8), generator=g)
  with torch.no_grad():
    ref = pipe(prompt=PROMPTS, image=init, strength=0.6, num_inference_steps=STEPS,
               guidance_scale=3.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
  ours = ics.image_to_image(bundle, PROMPTS, init, strength=0.6, num_steps=STEPS,
                            guidance_scale=3.0, mesh=one_device, output_type="float",
                            noise={"image": _nhwc(posterior), "latents": _nhwc(noise)})
  seeded = ics.image_to_image(bundle, PROMPTS, init, strength=0.6, num_steps=STEPS,
                              guidance_scale=3.0, mesh=one_device, output_type="float")
  _check(ours, ref, seeded)


@pytest.mark.parity
@pytest.mark.parametrize("strength", [1.0, pytest.param(0.75, marks=pytest.mark.slow)])
def test_inpainting_model_matches_diffusers(inpaint_pipeline, one_device, strength):
  from latent_diffusion_jax.interop.diffusers import load_pipeline
  pipe, directory = inpaint_pipeline
  bundle = load_pipeline(directory)
  assert bundle.unet.in_channels == 9 and bundle.image_conditioning.kind == "inpainting"
  init = _images(1, 2, 16)
  mask = np.zeros((2, 16, 16, 1), np.float32)
  mask[:, 4:12, 2:10] = 1.0
  g = torch.Generator().manual_seed(0)
  # Generator order: [image encoding (strength < 1)], initial noise, masked-image encoding.
  image_eps = torch.randn((2, 4, 8, 8), generator=g) if strength < 1 else None
  noise = torch.randn((2, 4, 8, 8), generator=g)
  masked_eps = torch.randn((2, 4, 8, 8), generator=g)
  with torch.no_grad():
    ref = pipe(prompt=PROMPTS, image=init, mask_image=mask, strength=strength, height=16,
               width=16, num_inference_steps=STEPS, guidance_scale=3.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
  given = {"latents": _nhwc(noise), "masked_image": _nhwc(masked_eps)}
  if image_eps is not None:
    given["image"] = _nhwc(image_eps)
  ours = ics.inpaint(bundle, PROMPTS, init, mask, strength=strength, num_steps=STEPS,
                     guidance_scale=3.0, mesh=one_device, output_type="float", noise=given)
  seeded = ics.inpaint(bundle, PROMPTS, init, mask, strength=strength, num_steps=STEPS,
                       guidance_scale=3.0, mesh=one_device, output_type="float")
  _check(ours, ref, seeded)


@pytest.mark.parity
@pytest.mark.slow
def test_renoising_inpainting_with_a_plain_model_matches_diffusers(sd_pipeline, one_device):
  """StableDiffusionInpaintPipeline with a 4-channel UNet: the known region is re-noised."""
  from latent_diffusion_jax.interop.diffusers import load_pipeline
  img2img, directory = sd_pipeline
  pipe = diffusers.StableDiffusionInpaintPipeline(**img2img.components)
  pipe.set_progress_bar_config(disable=True)
  bundle = load_pipeline(directory)
  init = _images(2, 2, 16)
  mask = np.zeros((2, 16, 16), np.float32)
  mask[:, 2:10, 6:14] = 1.0
  g = torch.Generator().manual_seed(0)
  # Generator order: image encoding, initial noise (then the unused masked-image encoding).
  image_eps = torch.randn((2, 4, 8, 8), generator=g)
  noise = torch.randn((2, 4, 8, 8), generator=g)
  with torch.no_grad():
    ref = pipe(prompt=PROMPTS, image=init, mask_image=mask[..., None], height=16, width=16,
               num_inference_steps=STEPS, guidance_scale=3.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
  ours = ics.inpaint(bundle, PROMPTS, init, mask, num_steps=STEPS, guidance_scale=3.0,
                     mesh=one_device, output_type="float",
                     noise={"latents": _nhwc(noise), "image": _nhwc(image_eps)})
  _check(ours, ref)


@pytest.mark.parity
def test_upscaler_matches_diffusers(upscale_pipeline, one_device):
  from latent_diffusion_jax.interop.diffusers import load_pipeline
  pipe, directory = upscale_pipeline
  bundle = load_pipeline(directory)
  cond = bundle.image_conditioning
  assert cond.kind == "upscaling" and cond.max_noise_level == 350
  assert (cond.noise.beta_start, cond.noise.beta_end) == (0.0001, 0.02)
  assert bundle.vae.downsample_factor == 4 and bundle.scaling_factor == pytest.approx(0.08333)
  assert bundle.unet.only_cross_attention == (True, False)  # the x4 upscaler's layout
  low = _images(3, 2, 8)
  g = torch.Generator().manual_seed(0)
  low_noise = torch.randn((2, 3, 8, 8), generator=g)
  noise = torch.randn((2, 4, 8, 8), generator=g)
  with torch.no_grad():
    ref = pipe(prompt=PROMPTS, image=low, noise_level=50, num_inference_steps=STEPS,
               guidance_scale=3.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
  assert ref.shape == (2, 32, 32, 3)
  ours = ics.upscale(bundle, PROMPTS, low, noise_level=50, num_steps=STEPS, guidance_scale=3.0,
                     mesh=one_device, output_type="float",
                     noise={"latents": _nhwc(noise), "low_res": _nhwc(low_noise)})
  seeded = ics.upscale(bundle, PROMPTS, low, noise_level=50, num_steps=STEPS,
                       guidance_scale=3.0, mesh=one_device, output_type="float")
  _check(ours, ref, seeded)
