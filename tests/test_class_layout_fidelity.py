"""The class and layout evaluators on generator images: real images with their own conditions
score (near) 100%, the same images under wrong conditions (near) 0."""

import numpy as np
import pytest
from scipy import ndimage

from latent_diffusion_jax.data import shapes, shapes_layout
from latent_diffusion_jax.evaluation.caption_fidelity import detect, detect_all
from latent_diffusion_jax.evaluation.class_fidelity import class_fidelity, detect_class
from latent_diffusion_jax.evaluation.layout_fidelity import layout_fidelity


def blurred(images, sigma=0.7):
  """Softened edges, as decoded generations have."""
  return np.stack([ndimage.gaussian_filter(image.astype(np.float32), (sigma, sigma, 0))
                   for image in images]).round().astype(np.uint8)


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_class_fidelity_scores_real_images_right_and_wrong_labels_wrong(split):
  images, _, attributes = shapes.generate_batch(0, 120, split=split)
  labels = [a["class_label"] for a in attributes]
  scores = class_fidelity(images, labels)
  assert scores["accuracy"] == 1.0 and scores["num_examples"] == 120
  assert set(scores["per_class"]) <= set(shapes.class_names())
  assert class_fidelity(blurred(images), labels)["accuracy"] >= 0.97
  # Next color (same shape): every image is wrong, though its shape is still right.
  wrong = class_fidelity(images, [(label // 6) * 6 + (label + 1) % 6 for label in labels])
  assert wrong["accuracy"] == 0.0 and wrong["color"] == 0.0 and wrong["shape"] == 1.0
  other_shape = class_fidelity(images, [(label + 6) % shapes.NUM_CLASSES for label in labels])
  assert other_shape["accuracy"] == 0.0 and other_shape["color"] == 1.0


def test_class_fidelity_on_a_blank_image_and_bad_input():
  blank = np.zeros((2, 32, 32, 3), np.uint8)
  assert detect_class(blank[0]) == -1
  assert class_fidelity(blank, [0, 5])["accuracy"] == 0.0
  with pytest.raises(ValueError, match="outside"):
    class_fidelity(blank, [0, 18])
  with pytest.raises(ValueError, match="2 images but 1"):
    class_fidelity(blank, [0])


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_layout_fidelity_scores_real_layouts_right_and_wrong_layouts_wrong(split):
  batch = shapes_layout.generate_batch(0, 100, split=split)
  images, boxes, classes = batch["images"], batch["layout_boxes"], batch["layout_classes"]
  scores = layout_fidelity(images, boxes, classes)
  assert scores["accuracy"] == 1.0 and scores["layouts_all_right"] == 1.0
  assert scores["num_boxes"] == int((classes >= 0).sum())
  assert layout_fidelity(blurred(images), boxes, classes)["accuracy"] >= 0.97

  next_color = np.where(classes >= 0, (classes // 6) * 6 + (classes + 1) % 6, -1)
  wrong = layout_fidelity(images, boxes, next_color)
  assert wrong["accuracy"] == 0.0 and wrong["present"] == 1.0
  # Boxes mirrored through the image center: mostly empty places.
  mirrored = np.where(classes[..., None] >= 0, 1 - boxes[..., [2, 3, 0, 1]], 0)
  assert layout_fidelity(images, mirrored, classes)["accuracy"] <= 0.1
  assert layout_fidelity(np.zeros_like(images), boxes, classes)["present"] == 0.0


def test_detect_all_finds_each_shape_and_detect_is_unchanged():
  image, _, objects = shapes_layout.generate_example(3, split="train")
  found = detect_all(image)
  assert len(found) == len(objects)
  for o in objects:
    (match,) = [f for f in found if o["box"][0] <= f["center"][0] <= o["box"][2]
                and o["box"][1] <= f["center"][1] <= o["box"][3]]
    assert (match["color"], match["shape"]) == (o["color"], o["shape"])
  single, _, attributes = shapes.generate_example(0)
  assert detect(single) == {k: attributes[k] for k in ("color", "position", "shape")}
  (only,) = detect_all(single)
  assert {k: only[k] for k in ("color", "position", "shape")} == detect(single)


def test_layout_fidelity_refuses_mismatched_input():
  with pytest.raises(ValueError, match=r"\[N, M, 4\]"):
    layout_fidelity(np.zeros((1, 32, 32, 3), np.uint8), np.zeros((1, 3, 3)), np.zeros((1, 3)))
  with pytest.raises(ValueError, match="outside"):
    layout_fidelity(np.zeros((1, 32, 32, 3), np.uint8), np.zeros((1, 1, 4)), np.full((1, 1), 18))


def test_demo_requests_cover_every_class_and_held_out_layouts():
  # The request helpers live beside the scorers, not in the shapes_demo command (its flags would
  # clash with other commands' imported into the same test process).
  from latent_diffusion_jax.evaluation.class_fidelity import class_requests
  from latent_diffusion_jax.evaluation.layout_fidelity import layout_requests
  labels = class_requests(3)
  assert labels.tolist() == [i for i in range(18) for _ in range(3)]
  requests = layout_requests(10)
  assert len(requests["layouts"]) == 10 and requests["layout_boxes"].shape == (10, 3, 4)
  for layout, classes in zip(requests["layouts"], requests["layout_classes"]):
    assert [c for _, c in layout] == [c for c in classes.tolist() if c >= 0]
  # The requests are the test split's, whose real images score 100%.
  batch = shapes_layout.generate_batch(0, 10, split="test")
  assert layout_fidelity(batch["images"], requests["layout_boxes"],
                         requests["layout_classes"])["accuracy"] == 1.0
