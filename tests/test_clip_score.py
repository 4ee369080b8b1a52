"""CLIP score: the Flax CLIP towers against transformers' CLIPModel and open_clip on random tiny
weights, CLIP's preprocessing against PIL's (transformers, open_clip), the metric's conventions
against torchmetrics' formula, and the errors a user can act on."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from torchvision_import import import_torchvision
from latent_diffusion_jax.core.errors import InputFileError, MissingInputError, UserInputError
from latent_diffusion_jax.data.tokenizers import build_word_tokenizer, load_tokenizer
from latent_diffusion_jax.evaluation.feature_nets import clip_weights
from latent_diffusion_jax.evaluation.feature_nets.clip import load_clip
from latent_diffusion_jax.evaluation.feature_nets.clip_preprocess import clip_preprocess
from latent_diffusion_jax.evaluation.metrics.clip_score import clip_score, pair_cosines
from latent_diffusion_jax.interop.files import PickleRefusedError

# float32 parity with the PyTorch references (observed <= 2e-6 on these tiny towers).
FP32_ATOL = 1e-4
# CLIP-normalized pixels equal to PIL's up to float32 rounding of (x / 255 - mean) / std.
PIXEL_ATOL = 1e-6
WORDS = ["a", "red", "blue", "circle", "square", "photo", "of", "cat", "dog", "in", "the", "grass"]
CAPTIONS = ["a red circle", "a photo of a cat", "the dog in the grass", "blue square",
            "a a a a a a a a a a a a a a a a a a a a a a"]  # longer than the context: truncated
IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def torch():
  import_torchvision()  # transformers' CLIP and open_clip import torchvision
  import torch
  torch.manual_seed(0)
  return torch


def _features(output):
  """transformers 5 returns a BaseModelOutputWithPooling from get_*_features, 4.x a tensor."""
  return (output.pooler_output if hasattr(output, "pooler_output") else output).numpy()


def _images(rng, count, height, width):
  return rng.integers(0, 256, (count, height, width, 3), dtype=np.uint8)


# --- transformers CLIPModel ----------------------------------------------------------------------

# OpenAI style (ViT-L/14: quick_gelu, legacy eos_token_id 2 = pool at the largest id) and LAION's
# ViT-H-14 in transformers' layout (gelu, explicit end-of-text id).
HF_VARIANTS = {"openai": dict(hidden_act="quick_gelu", legacy_eos=True),
               "laion": dict(hidden_act="gelu", legacy_eos=False)}


@pytest.fixture(scope="module", params=sorted(HF_VARIANTS))
def hf_clip(request, torch, tmp_path_factory):
  from transformers import CLIPConfig, CLIPModel
  variant = HF_VARIANTS[request.param]
  directory = str(tmp_path_factory.mktemp(f"hf_clip_{request.param}"))
  build_word_tokenizer(WORDS, directory, model_max_length=16)
  tokenizer = load_tokenizer(directory)
  act = variant["hidden_act"]
  text = dict(vocab_size=len(tokenizer.get_vocab()), hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16, hidden_act=act,
              bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
              eos_token_id=2 if variant["legacy_eos"] else tokenizer.eos_token_id)
  vision = dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=48, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, hidden_act=act)
  model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval()
  with torch.no_grad():  # LayerNorms and biases start at 1 and 0; randomize them too
    for name, param in model.named_parameters():
      if "norm" in name or name.endswith("bias") or "class_embedding" in name:
        param.add_(0.1 * torch.randn_like(param))
  model.save_pretrained(directory)
  return directory, model, tokenizer


@pytest.mark.parity
def test_transformers_clip_features_match(hf_clip, torch):
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  directory, model, tokenizer = hf_clip
  scorer = load_clip(directory)
  assert scorer.weights.source == "transformers" and scorer.dim == 24

  ids = scorer.tokenize(CAPTIONS)
  expected_ids = tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=16)["input_ids"]
  np.testing.assert_array_equal(ids, np.asarray(expected_ids))
  with torch.no_grad():
    text_expected = _features(model.get_text_features(input_ids=torch.tensor(ids, dtype=torch.long)))
  np.testing.assert_allclose(scorer.text_features(CAPTIONS), text_expected, atol=FP32_ATOL, rtol=0)

  # 11 images in batches of 8 over 8 devices: two batches, the second padded.
  images = _images(np.random.default_rng(0), 11, 45, 38)
  processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                    crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
  pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
  with torch.no_grad():
    image_expected = _features(model.get_image_features(pixel_values=pixels))
  ours = scorer.image_features(images, batch_size=8)
  assert ours.shape == (11, 24)
  np.testing.assert_allclose(ours, image_expected, atol=FP32_ATOL, rtol=0)

  result = scorer.score(images[:len(CAPTIONS)], CAPTIONS)
  expected = pair_cosines(image_expected[:len(CAPTIONS)], text_expected)
  assert result.count == len(CAPTIONS)
  assert result.cosine == pytest.approx(float(expected.mean()), abs=1e-5)


# --- open_clip -----------------------------------------------------------------------------------

# ViT-H-14's structure, scaled down: head_width != 64, gelu (no quick_gelu), argmax pooling.
OPEN_CLIP_TINY = dict(embed_dim=16,
                      vision_cfg=dict(image_size=IMAGE_SIZE, layers=2, width=40, head_width=10,
                                      patch_size=8),
                      text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=2))


@pytest.fixture(scope="module")
def open_clip_model(torch, tmp_path_factory):
  import open_clip
  directory = str(tmp_path_factory.mktemp("open_clip"))
  model = open_clip.model.CLIP(**OPEN_CLIP_TINY).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "ln" in name or name.endswith("bias"):
        param.add_(0.1 * torch.randn_like(param))
  state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  save_file(state, os.path.join(directory, "weights.safetensors"))
  # As open_clip's training saves it: DDP's "module." prefix under "state_dict", pickled.
  torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
             os.path.join(directory, "epoch_1.pt"))
  config = os.path.join(directory, "tiny-vit-h.json")
  with open(config, "w") as f:
    json.dump(OPEN_CLIP_TINY, f)
  return directory, model, config


@pytest.mark.parity
def test_open_clip_features_match(open_clip_model, torch):
  import open_clip
  from open_clip.transform import image_transform
  from PIL import Image
  directory, model, config = open_clip_model
  scorer = load_clip(os.path.join(directory, "weights.safetensors"), model_name=config)
  assert scorer.weights.source == "open_clip" and scorer.weights.vision.hidden_act == "gelu"

  captions = CAPTIONS + ["Two DOGS &amp; a frisbee!", "a  photo\nof  a cat, 2 dogs; 3 (birds)?",
                         "word " * 100]
  expected_ids = open_clip.tokenize(captions).numpy()
  np.testing.assert_array_equal(scorer.tokenize(captions), expected_ids)
  with torch.no_grad():
    expected = model.encode_text(torch.tensor(expected_ids)).numpy()
  np.testing.assert_allclose(scorer.text_features(captions), expected, atol=FP32_ATOL, rtol=0)

  images = _images(np.random.default_rng(1), 5, 45, 37)
  transform = image_transform(IMAGE_SIZE, is_train=False)
  pixels = torch.stack([transform(Image.fromarray(image)) for image in images])
  with torch.no_grad():
    expected = model.encode_image(pixels).numpy()
  np.testing.assert_allclose(scorer.image_features(images), expected, atol=FP32_ATOL, rtol=0)


def test_open_clip_pickled_training_checkpoint(open_clip_model):
  directory, _, config = open_clip_model
  path = os.path.join(directory, "epoch_1.pt")
  with pytest.raises(PickleRefusedError, match="pickle"):
    clip_weights.load_open_clip(path, config)
  pickled = clip_weights.load_open_clip(path, config, allow_pickle=True)
  safe = clip_weights.load_open_clip(os.path.join(directory, "weights.safetensors"), config)
  for a, b in ((pickled.vision_params, safe.vision_params), (pickled.text_params, safe.text_params)):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
      np.testing.assert_array_equal(x, y)


def test_open_clip_config_table_matches_package():
  for name, config in clip_weights.OPEN_CLIP_CONFIGS.items():
    packaged = clip_weights._package_model_config(name)
    assert packaged is not None, name
    assert {k: packaged[k] for k in config} == config, name
  config, _ = clip_weights.open_clip_config("ViT-H-14")
  vision, text = clip_weights.open_clip_modules(config)
  assert (vision.num_attention_heads, vision.intermediate_size, vision.hidden_act) == (16, 5120, "gelu")
  assert (text.num_attention_heads, text.eos_token_id, vision.projection_dim) == (16, 2, 1024)
  config, _ = clip_weights.open_clip_config("ViT-L-14-quickgelu")
  assert clip_weights.open_clip_modules(config)[0].hidden_act == "quick_gelu"


# --- preprocessing -------------------------------------------------------------------------------

# Downscales (the generated-image case), an upscale, non-square both ways, and (200, 210): resized to
# 224 x 235, an odd excess of 11 where transformers' floor and torchvision's round-half-even crops
# are one pixel apart.
PREPROCESS_SIZES = [(512, 512), (300, 260), (97, 131), (200, 210)]


@pytest.mark.parity
def test_preprocessing_equals_pil_pipelines(torch):
  from PIL import Image
  from open_clip.transform import image_transform
  from transformers import CLIPImageProcessor
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  rng = np.random.default_rng(2)
  transformers_pil, transformers_torch = CLIPImageProcessorPil(), CLIPImageProcessor()
  open_clip_transform = image_transform(224, is_train=False)
  for height, width in PREPROCESS_SIZES:
    image = _images(rng, 1, height, width)[0]
    floor = np.asarray(clip_preprocess(image[None], 224, crop_rounding="floor"))[0]
    half_even = np.asarray(clip_preprocess(image[None], 224, crop_rounding="half_even"))[0]
    expected = transformers_pil(images=[image], return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(floor, expected.transpose(1, 2, 0), atol=PIXEL_ATOL, rtol=0)
    expected = open_clip_transform(Image.fromarray(image)).numpy()
    np.testing.assert_allclose(half_even, expected.transpose(1, 2, 0), atol=PIXEL_ATOL, rtol=0)
    if (height, width) == (200, 210):
      assert np.abs(floor - half_even).max() > 0.1  # the two crop conventions really differ here
    # transformers 5's default processor resizes with torch's antialiased bicubic: at most two
    # levels apart from PIL, on about 1% of the pixels (measured 0.004-0.007 levels on average).
    tensor = torch.from_numpy(image).permute(2, 0, 1)
    other = transformers_torch(images=[tensor], return_tensors="np")["pixel_values"][0]
    std = np.asarray((0.26862954, 0.26130258, 0.27577711))
    levels = np.abs(floor - other.transpose(1, 2, 0)) * std * 255
    assert levels.max() <= 2.0 + 1e-3 and levels.mean() < 0.02, (height, width)
    print(f"torch vs PIL resize {height}x{width}: max {levels.max():.2f} levels, "
          f"mean {levels.mean():.4f}, {np.mean(levels > 0.5):.2%} of pixel values differ")


def test_preprocessing_float_input_is_quantized_like_uint8():
  image = _images(np.random.default_rng(3), 2, 50, 40)
  from_uint8 = np.asarray(clip_preprocess(image, IMAGE_SIZE))
  from_float = np.asarray(clip_preprocess(image.astype(np.float32) / 255.0, IMAGE_SIZE))
  np.testing.assert_array_equal(from_uint8, from_float)
  assert from_uint8.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)


# --- the metric ----------------------------------------------------------------------------------


def test_clip_score_constructed_cases():
  v = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])
  same = clip_score(v, 5 * v)
  assert (same.cosine, same.torchmetrics, same.clipped, same.count) == pytest.approx((1, 100, 100, 2))
  orthogonal = clip_score(np.array([[1.0, 0.0]]), np.array([[0.0, 7.0]]))
  assert (orthogonal.cosine, orthogonal.torchmetrics, orthogonal.clipped) == pytest.approx((0, 0, 0))
  opposite = clip_score(v, -v)
  assert (opposite.cosine, opposite.torchmetrics, opposite.clipped) == pytest.approx((-1, 0, 0))
  # cos 0.5 and -0.3: torchmetrics clamps the mean (10), the per-pair convention each cosine (25).
  mixed = clip_score(np.array([[1.0, 0.0], [1.0, 0.0]]),
                     np.array([[0.5, np.sqrt(0.75)], [-0.3, np.sqrt(0.91)]]))
  assert (mixed.cosine, mixed.torchmetrics, mixed.clipped) == pytest.approx((0.1, 10.0, 25.0))


def test_clip_score_equals_torchmetrics_formula(torch):
  rng = np.random.default_rng(4)
  image, text = rng.normal(size=(64, 12)), rng.normal(size=(64, 12)) + 0.3
  # torchmetrics' CLIPScore: update sums 100 * <x/|x|, y/|y|>, compute clamps the mean at zero.
  x, y = torch.tensor(image), torch.tensor(text)
  score = 100 * (x / x.norm(p=2, dim=-1, keepdim=True) * (y / y.norm(p=2, dim=-1, keepdim=True))).sum(-1)
  expected = torch.max(score.sum(0) / len(score), torch.zeros(())).item()
  cosine = torch.nn.functional.cosine_similarity(x, y, dim=-1)
  result = clip_score(image, text)
  assert result.torchmetrics == pytest.approx(expected, rel=1e-12)
  assert result.cosine == pytest.approx(cosine.mean().item(), rel=1e-12)
  assert result.clipped == pytest.approx((100 * cosine.clamp(min=0)).mean().item(), rel=1e-12)


# --- errors --------------------------------------------------------------------------------------


def test_clip_score_shape_errors():
  with pytest.raises(UserInputError, match="differ in shape"):
    clip_score(np.ones((3, 4)), np.ones((2, 4)))
  with pytest.raises(UserInputError, match="differ in shape"):
    clip_score(np.ones((3, 4)), np.ones((3, 5)))
  with pytest.raises(UserInputError, match=r"\[N, D\]"):
    clip_score(np.ones(4), np.ones(4))
  with pytest.raises(UserInputError, match="non-zero"):
    clip_score(np.zeros((1, 4)), np.ones((1, 4)))


def test_loading_errors(tmp_path, open_clip_model):
  directory, model, config = open_clip_model
  with pytest.raises(MissingInputError, match="CLIPModel directory"):
    load_clip(str(tmp_path / "nowhere"))
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "notes.txt").write_text("hi")
  with pytest.raises(InputFileError, match="not a CLIP model directory"):
    load_clip(str(tmp_path / "junk"))
  weights = os.path.join(directory, "weights.safetensors")
  with pytest.raises(UserInputError, match="model_name"):
    load_clip(weights)
  with pytest.raises(UserInputError, match="Unknown open_clip model name"):
    load_clip(weights, model_name="ViT-Q-99")
  with pytest.raises(InputFileError, match="shape mismatches"):
    load_clip(weights, model_name="ViT-B-32")  # the wrong architecture for these weights
  with pytest.raises(UserInputError, match="kind"):
    load_clip(weights, kind="jax")
  with pytest.raises(InputFileError, match="is a file"):
    load_clip(weights, kind="transformers")
  unsupported = dict(OPEN_CLIP_TINY, vision_cfg=dict(OPEN_CLIP_TINY["vision_cfg"], ls_init_value=0.1))
  path = tmp_path / "ls.json"
  path.write_text(json.dumps(unsupported))
  with pytest.raises(UserInputError, match="ls_init_value"):
    load_clip(weights, model_name=str(path))
  # A foreign key in the state dict is named, not ignored.
  state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  state["visual.head.weight"] = np.zeros((2, 2), np.float32)
  save_file(state, str(tmp_path / "extra.safetensors"))
  with pytest.raises(InputFileError, match="visual.head.weight"):
    load_clip(str(tmp_path / "extra.safetensors"), model_name=config)
  scorer = load_clip(weights, model_name=config)
  with pytest.raises(UserInputError, match="one caption per image"):
    scorer.score(_images(np.random.default_rng(5), 2, 32, 32), ["a cat"])
  with pytest.raises(UserInputError, match="list of strings"):
    scorer.text_features("a cat")
  with pytest.raises(UserInputError, match="RGB"):
    scorer.image_features(np.zeros((2, 32, 32), np.uint8))


def test_transformers_directory_without_tokenizer(hf_clip, tmp_path):
  import shutil
  directory, _, _ = hf_clip
  bare = tmp_path / "bare"
  bare.mkdir()
  for name in ("config.json", "model.safetensors"):
    shutil.copy(os.path.join(directory, name), bare / name)
  with pytest.raises(MissingInputError, match="tokenizer_path"):
    load_clip(str(bare))
  scorer = load_clip(str(bare), tokenizer_path=directory)
  assert scorer.tokenize(["a cat"]).shape == (1, 16)


def test_bfloat16_features_close_to_float32(open_clip_model):
  import jax.numpy as jnp
  directory, _, config = open_clip_model
  weights = os.path.join(directory, "weights.safetensors")
  images = _images(np.random.default_rng(6), 3, 40, 40)
  full = load_clip(weights, model_name=config)
  half = load_clip(weights, model_name=config, dtype=jnp.bfloat16)
  for a, b in ((full.image_features(images), half.image_features(images)),
               (full.text_features(CAPTIONS[:3]), half.text_features(CAPTIONS[:3]))):
    print("bf16 vs fp32 cosines", pair_cosines(a, b))
    assert np.all(pair_cosines(a, b) > 0.999)  # observed >= 0.9999 on this tiny model
