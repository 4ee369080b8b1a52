"""The image-conditioned evaluators (issue 14's measurements): each scores ground-truth-like
images high and wrong ones (colors rotated, the filled region blank, noise) low (fast); the
image_fidelity command on 2-step tiny runs of the three shapes configs and the re-noising
inpainting path on a random text-to-image bundle (slow)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.data import degradation, segmentation, shapes
from latent_diffusion_jax.evaluation import held_out_images, inpaint_fidelity, semantic_fidelity
from latent_diffusion_jax.evaluation import sr_fidelity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def held_out():
  return held_out_images.held_out_examples(24, 32)


def _rotate_colors(images):
  """Every palette color becomes another one (red -> blue, blue -> green, yellow -> magenta...)."""
  return np.ascontiguousarray(np.asarray(images)[..., [1, 2, 0]])


def test_held_out_examples_are_the_test_split(held_out):
  images, captions, attributes = held_out
  assert images.shape == (24, 32, 32, 3) and images.dtype == np.uint8
  held = set(shapes.combinations("test"))
  assert all((a["color"], a["shape"], a["position"]) in held for a in attributes)
  assert captions[0] == shapes.caption(attributes[0])
  with pytest.raises(UserInputError, match="num_images"):
    held_out_images.held_out_examples(0)


def test_masked_psnr_counts_only_kept_pixels():
  a = np.zeros((1, 4, 4, 3), np.uint8)
  b = a.copy()
  b[0, :2] = 255
  keep = np.zeros((1, 4, 4), bool)
  keep[0, 2:] = True
  assert held_out_images.masked_psnr(a, b, keep)[0] == pytest.approx(100.0)
  keep[0, 1] = True  # a third of the kept pixels are off by the full range: MSE 1/3
  assert held_out_images.masked_psnr(a, b, keep)[0] == pytest.approx(10 * np.log10(3), abs=1e-6)


def test_quadrant_masks_cover_the_shape_or_the_named_cell(held_out):
  _, _, attributes = held_out
  masks = inpaint_fidelity.quadrant_masks(attributes, 32)
  assert masks.shape == (24, 32, 32) and set(np.unique(masks)) == {0, 255}
  assert (masks > 0).mean() == pytest.approx(0.25)
  for mask, attrs in zip(masks, attributes):
    row, col = divmod(shapes.POSITIONS.index(attrs["position"]), 2)
    assert mask[row * 16 + 8, col * 16 + 8] == 255
  fixed = inpaint_fidelity.quadrant_masks(attributes, 32, "bottom right")
  assert (fixed[:, 16:, 16:] == 255).all() and (fixed[:, :16] == 0).all()
  with pytest.raises(UserInputError, match="quadrant"):
    inpaint_fidelity.quadrant_masks(attributes, 32, "middle")


def test_inpaint_scores_real_images_high_and_wrong_fills_low(held_out):
  images, _, attributes = held_out
  masks = inpaint_fidelity.quadrant_masks(attributes, 32)
  rng = np.random.default_rng(0)
  recon = np.clip(images.astype(int) + rng.integers(-6, 7, images.shape), 0, 255).astype(np.uint8)
  right = inpaint_fidelity.inpaint_scores(images, images, recon, masks, attributes)
  assert right["color_and_shape"] >= 0.95 and right["position"] == 1.0
  assert right["psnr_outside"] == pytest.approx(100.0)
  assert right["outside_gap_db"] < 0 < right["psnr_outside_reconstruction"] < 100
  # The filled quadrant's colors rotated: the shapes are right, the colors wrong.
  inside = (masks > 0)[..., None]
  swapped = np.where(inside, _rotate_colors(images), images)
  wrong = inpaint_fidelity.inpaint_scores(swapped, images, recon, masks, attributes)
  assert wrong["color"] == 0.0 and wrong["color_and_shape"] == 0.0
  assert wrong["shape"] >= 0.95 and wrong["psnr_outside"] == pytest.approx(100.0)
  # Left blank: nothing detected; noise outside the mask: the kept pixels changed more than
  # the reconstruction changes them.
  noisy = np.clip(images.astype(int) + rng.integers(-40, 41, images.shape), 0, 255)
  blank = np.where(inside, 0, noisy).astype(np.uint8)
  empty = inpaint_fidelity.inpaint_scores(blank, images, recon, masks, attributes)
  assert empty["color_and_shape"] == 0.0 and empty["outside_gap_db"] > 5.0


def test_inpaint_scores_expect_an_empty_quadrant_away_from_the_shape(held_out):
  images, _, attributes = held_out
  masks = inpaint_fidelity.quadrant_masks(attributes, 32, "top left")
  scores = inpaint_fidelity.inpaint_scores(images, images, images, masks, attributes)
  assert scores["all"] == 1.0
  rows = scores["per_example"]
  assert any(r["expected"]["shape"] == "none" for r in rows)
  assert any(r["expected"]["shape"] != "none" for r in rows)
  with pytest.raises(UserInputError, match="as many"):
    inpaint_fidelity.inpaint_scores(images[:2], images, images, masks, attributes)


def test_sr_scores_ground_truth_above_bicubic_and_wrong_colors_below(held_out):
  images, _, _ = held_out
  low = degradation.degrade(images, 4, "bicubic")
  bicubic = sr_fidelity.bicubic_upsample(low, 32)
  assert bicubic.shape == images.shape and bicubic.dtype == np.uint8
  right = sr_fidelity.sr_scores(images, images, bicubic)
  assert right["psnr"] == pytest.approx(100.0) and right["ssim"] == pytest.approx(1.0, abs=1e-5)
  assert right["beats_bicubic"] and right["detector_agreement"] == 1.0
  assert 10 < right["psnr_bicubic"] < 40 and right["ssim_bicubic"] < 1.0
  wrong = sr_fidelity.sr_scores(_rotate_colors(images), images, bicubic)
  assert wrong["detector_agreement"] == 0.0 and not wrong["beats_bicubic"]
  assert wrong["psnr"] < right["psnr_bicubic"]


@pytest.mark.parametrize("scheme", sorted(segmentation.SCHEMES))
def test_semantic_scores_follow_the_map_colors(held_out, scheme):
  images, _, attributes = held_out
  labels = segmentation.shapes_segmentation(images, [a["color"] for a in attributes],
                                            [a["shape"] for a in attributes], scheme)
  right = semantic_fidelity.semantic_scores(images, labels, scheme, attributes)
  assert right["shape_agreement"] >= 0.97 and right["background_agreement"] >= 0.99
  wrong = semantic_fidelity.semantic_scores(_rotate_colors(images), labels, scheme, attributes)
  assert wrong["shape_agreement"] <= 0.05 and wrong["background_agreement"] >= 0.99
  blank = semantic_fidelity.semantic_scores(np.zeros_like(images), labels, scheme, attributes)
  assert blank["shape_agreement"] == 0.0 and blank["background_agreement"] == 1.0


def test_semantic_expected_colors_decode_the_classes():
  labels = np.asarray([[[0, segmentation.class_id("blue", "triangle", "color_shape")]]])
  assert semantic_fidelity.expected_colors(labels, "color_shape").tolist() == [[[0, 3]]]
  labels = np.asarray([[[0, segmentation.class_id("cyan", "circle", "color")]]])
  assert semantic_fidelity.expected_colors(labels, "color").tolist() == [[[0, 6]]]
  with pytest.raises(UserInputError, match="names no colors"):
    semantic_fidelity.expected_colors(labels, "shape")


# End to end on 2-step tiny runs.

def _subprocess(args, **kw):
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=8", "--xla_force_host_platform_device_count=2"))
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=900, **kw)


@pytest.mark.slow
def test_image_fidelity_command_on_two_step_runs(tmp_path):
  configs = {"inpaint": "shapes_inpaint_ldm.py", "sr": "shapes_sr_ldm.py",
             "semantic": "shapes_semantic_ldm.py"}
  for task, config in configs.items():
    workdir = str(tmp_path / task)
    proc = _subprocess(["train.py", "--config", f"configs/{config}:tiny", "--workdir", workdir,
                        f"--config.data.data_dir={tmp_path / 'tfds'}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / f"{task}_out"
    # The semantic run also gets a bar no random model meets: the scores are still written.
    bar = ["--min_agreement", "1.01"] if task == "semantic" else []
    keep = ["--keep_unmasked", "--max_outside_gap_db", "0"] if task == "inpaint" else []
    proc = _subprocess(["-m", "latent_diffusion_jax.cli.image_fidelity", "--task", task,
                        "--checkpoint", workdir, "--out", str(out), "--num_images", "4",
                        "--steps", "2", "--batch_size", "4", *bar, *keep])
    if bar:
      assert proc.returncode != 0 and "below the bar: shape_agreement" in proc.stderr
      assert "Traceback" not in proc.stderr
    else:
      assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"{task} fidelity on 4 held-out images" in proc.stdout
    assert "batch 1/1 sampled" in proc.stdout
    with open(out / f"{task}_fidelity.json") as f:
      scores = json.load(f)
    assert scores["num_examples"] == 4 and len(scores["per_example"]) == 4
    assert os.path.isfile(out / "grid.png")
    if keep:
      # Composited: kept pixels are the input's (100 dB, the cap); the untrained model's are not.
      assert scores["keep_unmasked"] and scores["psnr_outside"] == 100.0
      assert scores["psnr_outside_model"] < 60.0 and "psnr_outside_model" in proc.stdout
  # A model of another kind is named.
  from latent_diffusion_jax.artifacts.workdir import load_bundle
  with pytest.raises(UserInputError, match="needs a model with upscaling conditioning"):
    sr_fidelity.evaluate(load_bundle(str(tmp_path / "semantic")), num_images=2)


@pytest.mark.slow
def test_inpaint_fidelity_renoises_with_a_text_to_image_model(tmp_path):
  from tiny_bundles import tiny_bundle
  bundle = tiny_bundle(str(tmp_path))
  scores = inpaint_fidelity.evaluate(bundle, num_images=2, num_steps=2, batch_size=2,
                                     out_dir=str(tmp_path / "out"))
  assert scores["mode"] == "inpaint_renoise" and scores["num_examples"] == 2
  assert 0.0 < scores["psnr_outside"] < 100.0
  assert scores["psnr_outside_model"] == scores["psnr_outside"] and not scores["keep_unmasked"]
  # The library's keep_unmasked: the mask is the alpha of a composite over the input image.
  from latent_diffusion_jax.sampling.image_conditioned import generate_from_images
  rng = np.random.default_rng(0)
  size = bundle.image_size
  image = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
  mask = np.zeros((1, size, size), np.float32)
  mask[:, : size // 2] = 1.0
  mask[:, size // 2, : size // 2] = 0.25
  kw = dict(init_image=image, mask_image=mask, num_steps=2, guidance_scale=1.0,
            output_type="float")
  plain = generate_from_images(bundle, [""], **kw)
  kept = generate_from_images(bundle, [""], keep_unmasked=True, **kw)
  unit = image / 255.0
  np.testing.assert_allclose(kept[:, size // 2 + 1:], unit[:, size // 2 + 1:], atol=1e-6)
  np.testing.assert_allclose(kept[:, : size // 2], plain[:, : size // 2], atol=1e-6)
  np.testing.assert_allclose(kept[:, size // 2, : size // 2],
                             0.25 * plain[:, size // 2, : size // 2]
                             + 0.75 * unit[:, size // 2, : size // 2], atol=1e-5)
  assert np.abs(plain[:, size // 2 + 1:] - unit[:, size // 2 + 1:]).max() > 0.01
  with pytest.raises(UserInputError, match="keep_unmasked is an inpainting setting"):
    generate_from_images(bundle, [""], init_image=image, keep_unmasked=True, num_steps=2)
  assert os.path.isfile(tmp_path / "out" / "inpaint_fidelity.json")
