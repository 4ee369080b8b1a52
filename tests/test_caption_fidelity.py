"""Tests for the pixel-rule caption-fidelity detector on clean and corrupted shapes images."""

import numpy as np
import pytest
from scipy import ndimage

from latent_diffusion_jax.data import shapes
from latent_diffusion_jax.evaluation import caption_fidelity


@pytest.fixture(scope="module")
def dataset():
  train = shapes.generate_batch(0, 300, split="train", seed=11)
  test = shapes.generate_batch(0, 100, split="test", seed=11)
  return np.concatenate([train[0], test[0]]), train[2] + test[2]


def _corrupt(images, noise, blur, scale=1.0, seed=0):
  x = images.astype(np.float32) / 255.0 * scale
  x = ndimage.gaussian_filter(x, sigma=(0, blur, blur, 0))
  x = x + np.random.default_rng(seed).normal(0.0, noise, x.shape)
  return np.clip(x, 0.0, 1.0)


def test_clean_images_are_read_back_exactly(dataset):
  images, attributes = dataset
  scores = caption_fidelity.caption_fidelity(images, attributes)
  print(f"clean: shape accuracy {scores['shape']:.3f}")
  assert scores["num_examples"] == 400
  assert scores["color"] == scores["position"] == scores["color_and_position"] == 1.0
  assert scores["shape"] >= 0.95


@pytest.mark.parametrize("noise, blur, scale", [
    (0.05, 0.7, 1.0),  # Gaussian noise plus slight blur.
    (0.02, 0.7, 0.6),  # Dim, washed-out colors.
])
def test_noisy_blurry_images_keep_color_and_position(dataset, noise, blur, scale):
  images, attributes = dataset
  scores = caption_fidelity.caption_fidelity(_corrupt(images, noise, blur, scale), attributes)
  print(f"noise {noise}, blur {blur}, scale {scale}: shape accuracy {scores['shape']:.3f}")
  assert scores["color"] >= 0.95 and scores["position"] >= 0.95
  assert scores["shape"] >= 0.9


def test_float_and_uint8_inputs_agree_and_specks_are_ignored(dataset):
  images, _ = dataset
  image = images[0].copy()
  expected = caption_fidelity.detect(image)
  assert caption_fidelity.detect(image.astype(np.float32) / 255.0) == expected
  # A stray bright pixel in another quadrant must not move or recolor the shape.
  corner = (1, 30) if expected["position"] != "top right" else (30, 1)
  image[corner] = 255
  assert caption_fidelity.detect(image) == expected


def test_empty_images_detect_none_and_score_wrong():
  blank = np.zeros((2, 32, 32, 3), np.uint8)
  blank[1] += 10  # Faint haze, still background.
  expected = [{"color": "red", "shape": "circle", "position": "top left"}] * 2
  scores = caption_fidelity.caption_fidelity(blank, expected)
  assert caption_fidelity.detect(blank[0]) == {
      "color": "none", "position": "none", "shape": "none"}
  assert scores["color"] == scores["position"] == scores["shape"] == scores["all"] == 0.0


def test_per_example_results_and_wrong_attributes(dataset):
  images, attributes = dataset
  wrong = [dict(a, color="green" if a["color"] != "green" else "red") for a in attributes[:5]]
  scores = caption_fidelity.caption_fidelity(images[:5], wrong)
  assert scores["color"] == 0.0 and scores["position"] == 1.0
  assert scores["color_and_position"] == 0.0
  first = scores["per_example"][0]
  assert first["detected"]["color"] == attributes[0]["color"]
  assert first["expected"]["color"] == wrong[0]["color"] and not first["color"]
  with pytest.raises(ValueError, match="attribute"):
    caption_fidelity.caption_fidelity(images[:2], attributes[:3])


def test_demo_bar_counts_all_three_attributes(dataset):
  """`make demo`'s pass/fail bar (shapes_demo --min_accuracy) reads the share of images with color,
  position and shape all right; color and position only when asked (--caption_bar)."""
  from latent_diffusion_jax.evaluation import shapes_scores
  images, attributes = dataset
  # Right color and position, wrong shape on the first three of eight.
  expected = [dict(a, shape=next(s for s in shapes.SHAPES if s != a["shape"])) if i < 3 else a
              for i, a in enumerate(attributes[:8])]
  scores = dict(caption_fidelity.caption_fidelity(images[:8], expected), task="caption",
                num_examples=8)
  assert scores["color_and_position"] == 1.0 and scores["all"] == 5 / 8
  assert shapes_scores.headline(scores) == 5 / 8
  assert shapes_scores.headline(scores, "color_and_position") == 1.0
  assert "all three 62.5%" in shapes_scores.summary_line(scores)
  with pytest.raises(ValueError, match="caption_bar"):
    shapes_scores.headline(scores, "shape")
