"""The evaluate command's library entry on the standard networks: FID and IS through the converted
FID Inception, the CLIP score through a transformers CLIPModel directory, each equal to what the
networks and metrics give when called directly (random tiny weights; nothing downloaded)."""

import os

import numpy as np
import pytest
from PIL import Image

from test_clip_score import IMAGE_SIZE, WORDS
from test_inception_fid import random_state_dict
from torchvision_import import import_torchvision
from latent_diffusion_jax.data import shapes
from latent_diffusion_jax.data.tokenizers import build_word_tokenizer, load_tokenizer
from latent_diffusion_jax.evaluation.feature_nets import inception_weights
from latent_diffusion_jax.evaluation.feature_nets.clip import load_clip
from latent_diffusion_jax.evaluation.metrics.fid import feature_stats, frechet_distance
from latent_diffusion_jax.evaluation.metrics.inception_score import inception_score
from latent_diffusion_jax.evaluation.run import run_evaluation


def _save_folder(folder, images):
  os.makedirs(folder)
  for i, image in enumerate(images):
    Image.fromarray(image).save(os.path.join(folder, f"{i:03d}.png"))
  return str(folder)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  base = tmp_path_factory.mktemp("evaluate_networks")
  generated, captions, _ = shapes.generate_batch(0, 8, split="train", seed=3)
  reference, _, _ = shapes.generate_batch(0, 8, split="test", seed=4)
  (base / "captions.txt").write_text("\n".join(captions) + "\n")
  weights = inception_weights.save(inception_weights.convert_state_dict(
      {k: v.numpy() for k, v in random_state_dict(seed=2).items()}), str(base / "inception.safetensors"))
  import_torchvision()  # transformers' CLIPModel imports it
  import torch
  from transformers import CLIPConfig, CLIPModel
  torch.manual_seed(0)
  clip_dir = str(base / "clip")
  build_word_tokenizer(WORDS + sorted({w for c in captions for w in c.split()}), clip_dir,
                       model_max_length=16)
  tokenizer = load_tokenizer(clip_dir)
  text = dict(vocab_size=len(tokenizer.get_vocab()), hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
              bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
              eos_token_id=tokenizer.eos_token_id, hidden_act="gelu")
  vision = dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=48, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu")
  CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).save_pretrained(
      clip_dir)
  return dict(base=base, generated=generated, reference=reference, captions=captions,
              captions_file=str(base / "captions.txt"), weights=weights, clip=clip_dir,
              generated_dir=_save_folder(base / "generated", generated),
              reference_dir=_save_folder(base / "reference", reference))


def test_inception_fid_is_and_clip_score_equal_direct_computation(inputs):
  got = run_evaluation(out_dir=str(inputs["base"] / "out"), images=inputs["generated_dir"],
                       captions=inputs["captions_file"], reference_images=inputs["reference_dir"],
                       features="inception", inception_weights=inputs["weights"],
                       clip=inputs["clip"], metrics=("fid", "is", "clip"))["metrics"]
  net = inception_weights.load(inputs["weights"])
  ours = net.extract(inputs["generated"])
  theirs = net.extract(inputs["reference"])
  fid = frechet_distance(feature_stats(ours["features"]), feature_stats(theirs["features"]))
  is_mean, _ = inception_score(ours["logits"], splits=got["is"]["splits"])
  assert got["fid"] == pytest.approx(fid, rel=1e-4)
  assert got["fid"] > 0
  assert got["is"]["mean"] == pytest.approx(is_mean, rel=1e-4)
  score = load_clip(inputs["clip"]).score(inputs["generated"], inputs["captions"])
  assert got["clip"]["cosine"] == pytest.approx(score.cosine, abs=1e-5)
  assert got["clip"]["torchmetrics"] == pytest.approx(score.torchmetrics, abs=1e-3)
  assert got["clip"]["count"] == 8
  # Shuffling the captions changes the score: the pairs are image i with caption i.
  shuffled = load_clip(inputs["clip"]).score(inputs["generated"], inputs["captions"][::-1])
  assert shuffled.cosine != pytest.approx(score.cosine, abs=1e-6)
