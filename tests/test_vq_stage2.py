"""A VQ first stage under stage 2: which latents are diffused (pre-quantization, deterministic),
how they are stored (pre-encode cache, latent shards), decoding through the quantizer, the
config/first-stage consistency checks, and export: native round trip and a diffusers
LDMTextToImagePipeline whose components decode what our sampler decodes."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion_jax.core.config import base_config, load_config_file
from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.data import shapes
from latent_diffusion_jax.data.tokenizers import build_word_tokenizer, load_tokenizer
from latent_diffusion_jax.models import build
from latent_diffusion_jax.models.autoencoder import AutoencoderKL
from latent_diffusion_jax.models.bundle import ModelBundle, decode_latents
from latent_diffusion_jax.models.text_encoders import CLIPTextModel
from latent_diffusion_jax.models.unet import UNet2DConditionModel
from latent_diffusion_jax.models.vq import VQModel
from latent_diffusion_jax.training.diffusion_step import DiffusionTask, encode_latents
from tiny_bundles import SD_DIFFUSION, _init, assert_trees_equal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 16
# diffusers' LDMTextToImagePipeline pads prompts to 77 tokens, so the CLIP bundle takes 77.
MAX_LENGTH = 77
# float32 decoders, ours vs diffusers', on [0, 1] pixels (as tests/test_export.py).
IMAGE_ATOL = 2e-3


def _vq(**kw):
  fields = dict(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=3,
                num_vq_embeddings=32, vq_embed_dim=3, norm_num_groups=8, mid_block_attention=False)
  fields.update(kw)
  return VQModel(**fields)


@pytest.fixture(scope="module")
def vq_and_params():
  vq = _vq()
  return vq, _init(vq, jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)), seed=3)


def _images(n=4, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


def _task(vae):
  return DiffusionTask(unet=None, vae=vae, conditioner=None, schedule=None,
                       prediction_type="epsilon")


def test_encode_latents_are_the_deterministic_pre_quantization_latents(vq_and_params):
  vq, params = vq_and_params
  images = _images()
  x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  z = np.asarray(vq.apply({"params": params}, x, method=vq.encode))
  assert z.shape == (4, 4, 4, 3)
  task = _task(vq)
  enc = jax.jit(lambda b, r: encode_latents(task, params, b, r))
  from_images = np.asarray(enc({"images": images}, jax.random.key(0)))
  np.testing.assert_allclose(from_images, z, atol=1e-5, rtol=0)
  # No sampling: another key gives the same latents; stored latents pass through unchanged, under
  # the shards' key ("latents") and the in-memory pre-encode cache's ("moments").
  np.testing.assert_array_equal(np.asarray(enc({"images": images}, jax.random.key(1))), from_images)
  for key in ("latents", "moments"):
    np.testing.assert_array_equal(np.asarray(enc({key: z}, jax.random.key(0))), z)
  # Not quantized: the codebook snaps them elsewhere.
  quantized = vq.apply({"params": params}, jnp.asarray(z), method=vq.quantize_latents).latents
  assert float(np.abs(np.asarray(quantized) - z).max()) > 1e-3


def test_encode_latents_refuses_the_other_kinds_encodings(vq_and_params):
  vq, params = vq_and_params
  with pytest.raises(UserInputError, match="pre-quantization latents have 3"):
    encode_latents(_task(vq), params, {"moments": np.zeros((2, 4, 4, 6), np.float32)},
                   jax.random.key(0))
  kl = AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, latent_channels=3,
                     norm_num_groups=4)
  with pytest.raises(UserInputError, match="autoencoder.kind='vq'"):
    encode_latents(_task(kl), {}, {"latents": np.zeros((2, 4, 4, 3), np.float32)},
                   jax.random.key(0))


def test_decoding_goes_through_the_quantizer(vq_and_params):
  vq, params = vq_and_params
  z = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 4, 3)), jnp.float32)
  v = {"params": params}
  q = vq.apply(v, z, method=vq.quantize_latents).latents
  expected = vq.apply(v, q, True, method=vq.decode)
  np.testing.assert_allclose(np.asarray(decode_latents(vq, params, z)), np.asarray(expected),
                             atol=1e-6, rtol=0)
  unquantized = vq.apply(v, z, True, method=vq.decode)
  assert float(jnp.abs(expected - unquantized).max()) > 1e-3
  # A bundle decodes its UNet-space (scaled) latents the same way.
  bundle = _vq_bundle(vq, params, text=None)
  np.testing.assert_allclose(np.asarray(bundle.decode(z * bundle.scaling_factor)),
                             np.asarray(expected), atol=1e-5, rtol=0)
  assert (bundle.first_stage_kind, bundle.latent_channels) == ("vq", 3)


def test_pre_encode_caches_vq_latents(vq_and_params, tmp_path):
  from latent_diffusion_jax.data.pre_encode import batch_field, encode_images
  vq, params = vq_and_params
  images = _images(5)
  out = encode_images(vq, params, images, batch_size=4, cache_dir=str(tmp_path))
  assert out.dtype == np.float16 and out.shape == (5, 4, 4, 3) and batch_field(vq) == "latents"
  assert [f.split("_")[0] for f in os.listdir(tmp_path)] == ["latents"]
  x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  np.testing.assert_allclose(out.astype(np.float32), vq.apply({"params": params}, x, method=vq.encode),
                             atol=2e-3, rtol=2e-3)
  np.testing.assert_array_equal(encode_images(vq, params, images, cache_dir=str(tmp_path)), out)


def _vq_stage2_config(**vq):
  c = base_config()
  c.autoencoder.kind = "vq"
  c.autoencoder.num_vq_embeddings = vq.get("num_vq_embeddings", 32)
  c.autoencoder.vq_embed_dim = 3
  c.model.image_size = IMAGE_SIZE
  c.model.vae.update(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=3,
                     norm_num_groups=8, mid_block_attention=False)
  c.model.unet.in_channels = c.model.unet.out_channels = 3
  return c


def test_first_stage_must_be_what_the_config_describes(vq_and_params):
  vq, _ = vq_and_params
  c = _vq_stage2_config()
  assert build.build_first_stage(c) == vq
  build.check_first_stage(c, vq, "stage1")
  kl = build.build_vae(c.model)
  with pytest.raises(UserInputError, match="autoencoder.kind='vq'.*--config.autoencoder.kind=kl"):
    build.check_first_stage(c, kl, "kl_dir")
  c.autoencoder.kind = "kl"
  with pytest.raises(UserInputError, match="autoencoder.kind='kl'.*--config.autoencoder.kind=vq"):
    build.check_first_stage(c, vq, "vq_dir")
  for key, value, message in (("autoencoder.num_vq_embeddings", 64, "autoencoder.num_vq_embeddings=64"),
                              ("model.vae.latent_channels", 4, "model.vae.latent_channels=4"),
                              ("model.unet.out_channels", 4, "model.unet.out_channels=4")):
    c = _vq_stage2_config()
    section, sub, *rest = key.split(".")
    target = c[section] if not rest else c[section][sub]
    target[rest[0] if rest else sub] = value
    with pytest.raises(UserInputError, match=message):
      build.check_first_stage(c, vq, "stage1")


def test_latent_shards_hold_vq_latents(tmp_path):
  from latent_diffusion_jax.data import latent_shards as ls
  z = np.arange(4 * 4 * 3, dtype=np.float16).reshape(4, 4, 3)
  record = ls.serialize_example(key="k", caption="c", latents=z, input_ids=np.arange(12),
                                original_size=(16, 16), crop_offset=(0, 0))
  back = ls.parse_example(record)
  assert "moments" not in back and back["latents"].dtype == np.float16
  np.testing.assert_array_equal(back["latents"], z)
  with pytest.raises(UserInputError, match="exactly one"):
    ls.serialize_example(key="k", caption="c", input_ids=np.arange(12), original_size=(1, 1),
                         crop_offset=(0, 0))

  from test_latent_shards import reader_config
  directory = str(tmp_path / "vq_shards")
  os.makedirs(directory)
  writer = ls.ShardWriter(os.path.join(directory, "00000" + ls.SHARD_SUFFIX))
  for n in range(8):
    writer.write(ls.serialize_example(key=f"k{n}", caption="c", latents=np.full((4, 4, 3), n, np.float16),
                                      input_ids=np.full(12, n), original_size=(16, 16),
                                      crop_offset=(0, 0)))
  writer.commit()
  ls.write_json(os.path.join(directory, ls.MANIFEST), dict(
      shards={"00000" + ls.SHARD_SUFFIX: {"kept": 8}}, storage_dtype="float16", first_stage="vq",
      latents_shape=[4, 4, 3], max_length=12, context_shape=None, vae_fingerprint="v",
      tokenizer_fingerprint="t", num_examples=8))
  c = reader_config(directory, check_vae_fingerprint=False)
  c.model.text_encoder.max_length = 12
  with pytest.raises(UserInputError, match="VQ first stage, but autoencoder.kind='kl'"):
    ls.training_reader(c, 4)
  c.autoencoder.kind, c.autoencoder.vq_embed_dim = "vq", 3
  c.model.vae.latent_channels = 3
  batch = next(ls.training_reader(c, 4))
  assert set(batch) == {"latents", "input_ids"} and batch["latents"].shape == (4, 4, 4, 3)
  # Each example's latents are its identity n, paired with its ids.
  np.testing.assert_array_equal(batch["latents"][:, 0, 0, 0], batch["input_ids"][:, 0])
  c.autoencoder.vq_embed_dim = 4
  with pytest.raises(UserInputError, match="latents \\[4, 4, 3\\]"):
    ls.training_reader(c, 4)


def test_encode_job_stores_vq_latents_and_their_scale(vq_and_params, tmp_path):
  from latent_diffusion_jax.data import encoder_job, latent_shards as ls
  from latent_diffusion_jax.data import webdataset as wds
  from latent_diffusion_jax.data.image_decode import preprocess_image
  from test_webdataset import RESOLUTION, kept_samples, write_shard
  assert RESOLUTION == IMAGE_SIZE
  vq, params = vq_and_params
  tokenizer = load_tokenizer(build_word_tokenizer(shapes.vocabulary(), str(tmp_path / "tok"), 12))
  c = load_config_file(os.path.join(ROOT, "configs/shapes_ldm_vq.py:tiny"))
  c.model.image_size = IMAGE_SIZE
  c.model.text_encoder.max_length = 12
  c.encode.batch_size = 8
  encoder = encoder_job.BatchEncoder(vq, params, batch_size=8)
  write_shard(tmp_path / "00000.tar", kept_samples())
  out = tmp_path / "latents"
  encoder_job.encode_shards(c, str(tmp_path / "00000.tar"), str(out), encoder=encoder,
                            tokenizer=tokenizer, scale_factor=0.5)
  manifest = json.load(open(out / ls.MANIFEST))
  assert manifest["first_stage"] == "vq" and manifest["latents_shape"] == [4, 4, 3]
  assert "moments_shape" not in manifest
  records = ls.read_shard(str(out / ("00000" + ls.SHARD_SUFFIX)))
  kept = kept_samples()
  pixels = []
  for r in records:
    data = next(v for k, v in kept[r["key"]].items() if k in wds.IMAGE_EXTENSIONS)
    pixels.append(preprocess_image(data, resolution=RESOLUTION, key=r["key"]).pixels)
  x = jnp.asarray(np.stack(pixels), jnp.float32) / 127.5 - 1.0
  direct = np.asarray(jax.jit(lambda p, x: vq.apply({"params": p}, x, method=vq.encode))(params, x))
  stored = np.stack([r["latents"] for r in records]).astype(np.float32)
  np.testing.assert_allclose(stored, direct, rtol=2e-3, atol=2e-3)
  # The manifest's estimate is 1/std of the deterministic latents (no posterior variance).
  assert manifest["estimated_scale_factor"] == pytest.approx(1.0 / direct.std(), rel=1e-3)


def _vq_bundle(vq, vq_params, text="clip", tmp_dir=None):
  """A tiny random VQ text-to-image bundle (CLIP-conditioned unless text is None)."""
  unet = UNet2DConditionModel(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                              attention_levels=(True, False), layers_per_block=1, num_heads=4,
                              cross_attention_dim=32)
  te = te_params = tok_dir = None
  if text == "clip":
    tok_dir = build_word_tokenizer(shapes.vocabulary(), os.path.join(tmp_dir, "tokenizer"),
                                   model_max_length=MAX_LENGTH)
    tokenizer = load_tokenizer(tok_dir)
    te = CLIPTextModel(vocab_size=len(tokenizer.get_vocab()), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=MAX_LENGTH, eos_token_id=tokenizer.eos_token_id)
    te_params = _init(te, jnp.zeros((1, MAX_LENGTH), jnp.int32), seed=2)
  latent = jnp.zeros((1, 4, 4, 3))
  unet_params = _init(unet, latent, jnp.zeros((1,), jnp.int32), jnp.zeros((1, MAX_LENGTH, 32)),
                      seed=0)
  return ModelBundle(unet=unet, unet_params=unet_params, vae=vq, vae_params=vq_params,
                     text_encoder=te, text_encoder_params=te_params, tokenizer_path=tok_dir,
                     scaling_factor=0.7, diffusion=dict(SD_DIFFUSION), image_size=IMAGE_SIZE,
                     max_length=MAX_LENGTH, metadata={"step": 7})


@pytest.fixture(scope="module")
def vq_bundle(vq_and_params, tmp_path_factory):
  return _vq_bundle(*vq_and_params, tmp_dir=str(tmp_path_factory.mktemp("vq_bundle")))


@pytest.fixture(scope="module")
def vq_diffusers(vq_bundle, tmp_path_factory):
  from latent_diffusion_jax.interop.export_diffusers import export_diffusers
  out = str(tmp_path_factory.mktemp("vq_diffusers"))
  written = export_diffusers(vq_bundle, out)
  assert written["vae"].endswith("vqvae") and written["text_encoder"].endswith("bert")
  return out


def test_native_round_trip_of_a_vq_bundle(vq_bundle, tmp_path):
  from latent_diffusion_jax.artifacts.loader import load_bundle
  from latent_diffusion_jax.interop.native import export_native
  export_native(vq_bundle, str(tmp_path / "native"))
  back = load_bundle(str(tmp_path / "native"))
  assert isinstance(back.vae, VQModel) and back.vae == vq_bundle.vae
  assert back.unet == vq_bundle.unet and back.text_encoder == vq_bundle.text_encoder
  for name in ("unet_params", "vae_params", "text_encoder_params"):
    assert_trees_equal(getattr(back, name), getattr(vq_bundle, name))
  assert back.scaling_factor == vq_bundle.scaling_factor


def test_diffusers_export_is_an_ldm_pipeline_that_loads_back(vq_bundle, vq_diffusers, tmp_path):
  from latent_diffusion_jax.artifacts import loader
  from latent_diffusion_jax.interop.diffusers import load_pipeline
  from latent_diffusion_jax.interop.export_diffusers import ExportError
  from latent_diffusion_jax.interop.single_file import export_single_file
  index = json.load(open(os.path.join(vq_diffusers, "model_index.json")))
  assert index["_class_name"] == "LDMTextToImagePipeline"
  assert index["vqvae"] == ["diffusers", "VQModel"] and index["bert"] == ["transformers", "CLIPTextModel"]
  back = load_pipeline(vq_diffusers)
  assert back.vae == vq_bundle.vae and back.text_encoder == vq_bundle.text_encoder
  for name in ("unet_params", "vae_params", "text_encoder_params"):
    assert_trees_equal(getattr(back, name), getattr(vq_bundle, name))
  assert (back.scaling_factor, back.image_size, back.max_length) == (0.7, IMAGE_SIZE, MAX_LENGTH)
  # A stage-2 run may take its frozen first stage and text encoder from the pipeline.
  parts = loader.pipeline_parts(vq_diffusers, ["vae", "text_encoder", "tokenizer"])
  assert [os.path.basename(parts[k]) for k in ("vae", "text_encoder")] == ["vqvae", "bert"]
  nets = loader.load_networks(vq_diffusers, ["vae"])
  assert isinstance(nets.networks["vae"].module, VQModel) and nets.scaling_factor == 0.7
  with pytest.raises(ExportError, match="native"):
    export_single_file(vq_bundle, str(tmp_path / "x.safetensors"))
  ldm_text = dataclasses.replace(vq_bundle, text_encoder=object())
  with pytest.raises(ExportError, match="LDMTextToImagePipeline.*--format native"):
    from latent_diffusion_jax.interop.export_diffusers import export_diffusers
    export_diffusers(ldm_text, str(tmp_path / "no"))


@pytest.mark.parity
def test_diffusers_components_decode_and_sample_what_we_do(vq_bundle, vq_diffusers):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from latent_diffusion_jax import sampling
  from latent_diffusion_jax.core import parallel
  pipe = diffusers.DiffusionPipeline.from_pretrained(vq_diffusers, local_files_only=True)
  assert type(pipe).__name__ == "LDMTextToImagePipeline"
  assert type(pipe.vqvae).__name__ == "VQModel" and type(pipe.bert).__name__ == "CLIPTextModel"
  # Decoding: diffusers' VQModel.decode (quantizes: force_not_quantize=False) of the same
  # UNet-space latents, which the pipeline unscales by the exported scaling_factor.
  latents = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32) * 1.5
  with torch.no_grad():
    theirs = pipe.vqvae.decode(torch.from_numpy(latents) / pipe.vqvae.config.scaling_factor).sample
  ours = vq_bundle.decode(jnp.asarray(latents.transpose(0, 2, 3, 1)))
  err = float(np.max(np.abs(np.asarray(ours).transpose(0, 3, 1, 2) - theirs.numpy()))) / 2
  print(f"VQ decode, max abs difference on [0, 1] pixels: {err:.3g}")
  assert err <= IMAGE_ATOL and float(theirs.std()) > 0.05
  # The whole pipeline (CLIP text, DDIM, guidance, VQ decode) against our sampler. Its __call__
  # sizes latents as height // 8, so an f4 model is called at twice its image size.
  prompt = "a red circle in the top left"
  noise = np.random.default_rng(1).standard_normal((1, 3, 4, 4)).astype(np.float32)
  with torch.no_grad():
    theirs = pipe(prompt, latents=torch.from_numpy(noise), num_inference_steps=4,
                  guidance_scale=3.0, height=8 * 4, width=8 * 4, output_type="np").images
  mesh = parallel.create_mesh({"data": 1}, devices=jax.local_devices()[:1])
  ours = sampling.generate(vq_bundle, [prompt], num_steps=4, guidance_scale=3.0, sampler="ddim",
                           initial_latents=noise.transpose(0, 2, 3, 1), mesh=mesh,
                           output_type="float")
  err = float(np.max(np.abs(ours - theirs)))
  print(f"LDMTextToImagePipeline vs our sampler, max abs difference on [0, 1] pixels: {err:.3g}")
  assert theirs.shape == ours.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert err <= IMAGE_ATOL and theirs.std() > 0.05
