"""Class labels and layouts of the shapes dataset: the class helpers, the layout generator and its
held-out split, the TFDS layout builder, and the batch fields data/batches.py hands training."""

import os

import numpy as np
import pytest

from latent_diffusion_jax.core.config import base_config
from latent_diffusion_jax.data import shapes, shapes_layout


def test_class_index_and_name_follow_the_contract():
  assert shapes.NUM_CLASSES == 18
  for i in range(shapes.NUM_CLASSES):
    color, shape = shapes.class_name(i).split(" ")
    assert shapes.class_index(color, shape) == i
    assert i == shapes.SHAPES.index(shape) * len(shapes.COLORS) + list(shapes.COLORS).index(color)
  assert shapes.class_name(0) == "red circle" and shapes.class_name(17) == "cyan triangle"
  assert len(set(shapes.class_names())) == 18
  with pytest.raises(ValueError, match=r"\[0, 18\)"):
    shapes.class_name(18)
  with pytest.raises(ValueError, match="colors: red"):
    shapes.class_index("purple", "circle")


def test_every_example_yields_its_class_label():
  _, captions, attributes = shapes.generate_batch(0, 40, split="train")
  for caption, a in zip(captions, attributes):
    assert shapes.class_name(a["class_label"]) == f"{a['color']} {a['shape']}"
    assert caption == shapes.caption(a)


def test_layouts_are_pure_non_overlapping_and_inside_the_image():
  first = shapes_layout.generate_example(11, split="train", seed=2)
  again = shapes_layout.generate_example(11, split="train", seed=2)
  np.testing.assert_array_equal(first[0], again[0])
  assert first[1:] == again[1:]
  batch = shapes_layout.generate_batch(0, 150, split="train")
  counts = {len(objects) for objects in batch["objects"]}
  assert counts == {1, 2, 3}
  for objects, caption in zip(batch["objects"], batch["captions"]):
    assert caption == " and ".join(f"a {o['color']} {o['shape']}" for o in objects)
    assert set(caption.split()) <= set(shapes_layout.layout_vocabulary())
    for k, o in enumerate(objects):
      x0, y0, x1, y1 = o["box"]
      assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
      for other in objects[k + 1:]:  # disjoint boxes
        assert (x1 <= other["box"][0] or other["box"][2] <= x0 or y1 <= other["box"][1]
                or other["box"][3] <= y0)
  # Padding rows: class -1 and a zero box.
  classes, boxes = batch["layout_classes"], batch["layout_boxes"]
  assert classes.shape == (150, 3) and boxes.shape == (150, 3, 4)
  assert (boxes[classes < 0] == 0).all() and ((classes >= 0).sum(1) == [len(o) for o in
                                                                     batch["objects"]]).all()
  assert shapes_layout.objects_from_arrays(boxes[0], classes[0])[0]["class_label"] == classes[0, 0]
  with pytest.raises(ValueError, match="max_boxes=2"):
    shapes_layout.layout_arrays(next(o for o in batch["objects"] if len(o) == 3), max_boxes=2)


def test_layout_pixels_show_each_shape_in_its_box():
  image, _, objects = shapes_layout.generate_example(5, image_size=48)
  covered = np.zeros(image.shape[:2], bool)
  for o in objects:
    x0, y0, x1, y1 = (int(round(v * 48)) for v in o["box"])
    region = image[y0:y1, x0:x1].reshape(-1, 3)
    assert shapes.COLORS[o["color"]] in set(map(tuple, region))
    covered[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = True
  assert (image[~covered] == 0).all()


def test_test_layouts_are_unseen_in_train():
  held_out = set(shapes.HELD_OUT_COMBINATIONS)
  triple = lambda o: (o["color"], o["shape"], shapes_layout.box_position(o["box"]))
  train = shapes_layout.generate_batch(0, 200, split="train")["objects"]
  test = shapes_layout.generate_batch(0, 200, split="test")["objects"]
  assert not any(triple(o) in held_out for objects in train for o in objects)
  assert all(any(triple(o) in held_out for o in objects) for objects in test)
  assert {triple(o) for objects in test for o in objects} >= held_out


def test_tfds_layout_builder_and_batch_fields(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from latent_diffusion_jax.data import batches
  c = base_config()
  c.model.image_size = 32
  c.data.num_train, c.data.num_test = 12, 6
  c.data.data_dir = str(tmp_path / "tfds")
  c.seed = 1
  c.model.conditioner.layout.max_boxes = 4

  c.data.shapes_variant = "layout"
  test = batches.load_shapes_split(c, str(tmp_path), None, "test")
  assert set(test) == {"images", "layout_boxes", "layout_classes"}
  assert test["layout_boxes"].shape == (6, 4, 4) and test["layout_classes"].dtype == np.int32
  expected = shapes_layout.generate_batch(0, 6, split="test", seed=1, max_boxes=4)
  # TFDS shuffles on write: compare (image, boxes, classes) triples in a canonical order.
  key = lambda i, b, k: (i.tobytes(), b.tobytes(), k.tobytes())
  assert sorted(map(key, test["images"], test["layout_boxes"], test["layout_classes"])) == sorted(
      map(key, expected["images"], expected["layout_boxes"], expected["layout_classes"]))

  c.data.shapes_variant = "single"
  single = batches.load_shapes_split(c, str(tmp_path), None, "train")
  images, _, attributes = shapes.generate_batch(0, 12, split="train", seed=1)
  by_image = {image.tobytes(): a["class_label"] for image, a in zip(images, attributes)}
  assert single["class_labels"].dtype == np.int32
  assert [by_image[i.tobytes()] for i in single["images"]] == single["class_labels"].tolist()

  c.data.shapes_variant = "grid"
  with pytest.raises(ValueError, match="single, layout"):
    batches.load_shapes_split(c, str(tmp_path), None, "train")
  c.data.shapes_variant = "layout"
  c.model.conditioner.layout.max_boxes = 2
  with pytest.raises(ValueError, match="max_boxes=2"):
    batches.load_shapes_split(c, str(tmp_path), None, "train")


def test_pre_encoded_batches_carry_the_conditions(tmp_path):
  import jax
  import jax.numpy as jnp
  from latent_diffusion_jax.core import parallel
  from latent_diffusion_jax.data import batches
  from latent_diffusion_jax.models import build
  from tiny_bundles import _init
  c = base_config()
  c.model.image_size = 16
  c.model.vae.block_out_channels = (8, 8)
  c.model.vae.norm_num_groups = 4
  c.data.num_train, c.data.num_test = 16, 4
  c.data.data_dir = str(tmp_path / "tfds")
  c.data.shapes_variant = "layout"
  vae = build.build_vae(c.model)
  params = _init(vae, jnp.zeros((1, 16, 16, 3)), seed=0)
  mesh = parallel.create_mesh((-1, 1, 1))
  it, gen = batches.make_batches(c, str(tmp_path), 8, mesh, vae=vae, vae_params=params)
  first_indices = np.sort(it.global_indices(0))
  batch = next(gen)
  arrays = batches.load_shapes_split(c, str(tmp_path), None, "train")
  assert set(batch) == {"moments", "layout_boxes", "layout_classes"}
  np.testing.assert_array_equal(jax.device_get(batch["layout_classes"]),
                                arrays["layout_classes"][first_indices])
  np.testing.assert_array_equal(jax.device_get(batch["layout_boxes"]),
                                arrays["layout_boxes"][first_indices])
  assert os.listdir(tmp_path / "latents")  # the cache was written
