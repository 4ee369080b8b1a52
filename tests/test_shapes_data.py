"""Tests for the captioned shapes dataset and its TFDS builder (prepared offline, tiny splits)."""

import itertools

import numpy as np
import pytest

from latent_diffusion_jax.data import shapes

ALL_COMBINATIONS = set(itertools.product(shapes.COLORS, shapes.SHAPES, shapes.POSITIONS))


def test_examples_are_a_pure_function_of_seed_split_and_index():
  image, caption, attributes = shapes.generate_example(7, split="train", seed=3)
  again = shapes.generate_example(7, split="train", seed=3)
  np.testing.assert_array_equal(image, again[0])
  assert (caption, attributes) == again[1:]

  images, captions, batch_attributes = shapes.generate_batch(5, 4, split="train", seed=3)
  np.testing.assert_array_equal(images[2], image)
  assert captions[2] == caption and batch_attributes[2] == attributes

  other_seed = shapes.generate_batch(5, 4, split="train", seed=4)[0]
  assert not np.array_equal(images, other_seed)


def test_images_have_constant_background_and_palette_colors():
  images, _, attributes = shapes.generate_batch(0, 20, split="train", image_size=48)
  assert images.shape == (20, 48, 48, 3) and images.dtype == np.uint8
  for image, attrs in zip(images, attributes):
    pixels = set(map(tuple, image.reshape(-1, 3)))
    assert tuple(image[0, 0]) == shapes.BACKGROUND
    assert shapes.COLORS[attrs["color"]] in pixels


def test_captions_match_attributes_and_use_the_vocabulary():
  vocabulary = set(shapes.vocabulary())
  for include_size in (False, True):
    _, captions, attributes = shapes.generate_batch(0, 50, split="test",
                                                    include_size=include_size)
    for caption, attrs in zip(captions, attributes):
      size = f"{attrs['size']} " if include_size else ""
      assert caption == f"a {size}{attrs['color']} {attrs['shape']} in the {attrs['position']}"
      assert set(caption.split()) <= vocabulary
  assert shapes.generate_example(0, include_size=True)[1].split()[1] in shapes.SIZES


def test_held_out_combinations_are_unseen_in_train_but_their_parts_are_seen():
  train, test = set(shapes.combinations("train")), set(shapes.combinations("test"))
  assert len(test) == 12 and not train & test and train | test == ALL_COMBINATIONS
  # Every attribute pair of a held-out triple is still seen in training.
  for pair in ((0, 1), (0, 2), (1, 2)):
    seen = {tuple(c[i] for i in pair) for c in train}
    assert all(tuple(c[i] for i in pair) in seen for c in test)


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_splits_draw_only_their_own_combinations(split):
  _, _, attributes = shapes.generate_batch(0, 200, split=split)
  drawn = {(a["color"], a["shape"], a["position"]) for a in attributes}
  allowed = set(shapes.combinations(split))
  assert drawn <= allowed
  if split == "test":
    assert drawn == allowed


def test_invalid_arguments_raise():
  with pytest.raises(ValueError, match="split"):
    shapes.generate_example(0, split="validation")
  with pytest.raises(ValueError, match="image_size"):
    shapes.generate_example(0, image_size=8)


def test_tfds_builder_prepares_offline_with_the_generated_examples(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  from latent_diffusion_jax.data import shapes_tfds

  defaults = {c.name: c for c in shapes_tfds.CaptionedShapes.BUILDER_CONFIGS}
  assert (defaults["default"].num_train, defaults["default"].num_test) == (20000, 512)
  assert defaults["sized"].include_size

  config = shapes_tfds.make_config(num_train=10, num_test=6, seed=1)
  builder = tfds.builder_cls("captioned_shapes")(data_dir=str(tmp_path / "tfds"), config=config)
  builder.download_and_prepare(download_dir=str(tmp_path / "downloads"))

  info = builder.info
  assert {name: split.num_examples for name, split in info.splits.items()} == {
      "train": 10, "test": 6}
  assert set(info.features) == {"image", "caption", "color", "shape", "position", "size"}
  examples = list(tfds.as_numpy(builder.as_dataset(split="test")))
  expected_images, expected_captions, _ = shapes.generate_batch(0, 6, split="test", seed=1)
  # TFDS shuffles on write, so compare contents in a canonical order.
  assert sorted(e["caption"].decode() for e in examples) == sorted(expected_captions)
  got = sorted(e["image"].tobytes() for e in examples)
  assert got == sorted(image.tobytes() for image in expected_images)
  for e in examples:
    combination = tuple(info.features[k].int2str(e[k]) for k in ("color", "shape", "position"))
    assert combination in shapes.HELD_OUT_COMBINATIONS
    assert e["image"].shape == (32, 32, 3) and e["image"].dtype == np.uint8
