"""The embedded captioned-shapes dataset as arrays: images, captions, attributes and token ids.

Generated with the TFDS builder into `<data_dir>` on first use (about a minute for 20000 images),
then read back; no download happens. `load_layout_split` does the same for the layout variant.
"""

import os
from typing import Dict, List

import numpy as np
from absl import logging

from latent_diffusion_jax.data import shapes


def load_split(data_dir: str, split: str, *, num_train: int, num_test: int, image_size: int = 32,
               seed: int = 0) -> Dict[str, np.ndarray]:
  """Prepares (once) and loads a split: images uint8 [N,S,S,3], captions, color/shape/position."""
  import tensorflow_datasets as tfds  # heavy; only the shapes data path needs it
  from latent_diffusion_jax.data import shapes_tfds
  builder = shapes_tfds.CaptionedShapes(
      data_dir=data_dir, config=shapes_tfds.make_config(
          num_train=num_train, num_test=num_test, image_size=image_size, seed=seed))
  if not os.path.isdir(builder.data_dir) or not builder.info.splits:
    logging.info("Generating the captioned shapes dataset into %s", data_dir)
  builder.download_and_prepare(download_dir=os.path.join(data_dir, "downloads"))
  data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
  names = lambda key, vocab: np.array([vocab[i] for i in data[key]])
  out = {
      "images": data["image"],
      "captions": np.array([c.decode() for c in data["caption"]]),
      "color": names("color", list(shapes.COLORS)),
      "shape": names("shape", list(shapes.SHAPES)),
      "position": names("position", list(shapes.POSITIONS)),
  }
  # The class follows from color and shape, so datasets prepared before classes existed serve.
  out["class_labels"] = (data["shape"].astype(np.int32) * len(shapes.COLORS)
                         + data["color"].astype(np.int32))
  return out


def load_layout_split(data_dir: str, split: str, *, num_train: int, num_test: int,
                      image_size: int = 32, seed: int = 0, max_boxes: int = 3
                      ) -> Dict[str, np.ndarray]:
  """Prepares (once) and loads a layout split: images uint8 [N,S,S,3], captions, "layout_boxes"
  float32 [N, max_boxes, 4] and "layout_classes" int32 [N, max_boxes] (padding: class -1, zero
  box)."""
  import tensorflow_datasets as tfds
  from latent_diffusion_jax.core.errors import UserInputError
  from latent_diffusion_jax.data import shapes_layout, shapes_tfds
  if max_boxes < shapes_layout.MAX_OBJECTS:
    raise UserInputError(f"The shapes layouts hold up to {shapes_layout.MAX_OBJECTS} boxes; "
                         f"model.conditioner.layout.max_boxes={max_boxes} must be at least that.")
  builder = shapes_tfds.ShapeLayouts(
      data_dir=data_dir, config=shapes_tfds.make_layout_config(
          num_train=num_train, num_test=num_test, image_size=image_size, seed=seed))
  if not os.path.isdir(builder.data_dir) or not builder.info.splits:
    logging.info("Generating the shapes layouts dataset into %s", data_dir)
  builder.download_and_prepare(download_dir=os.path.join(data_dir, "downloads"))
  data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
  n, stored = data["classes"].shape
  boxes = np.zeros((n, max_boxes, 4), np.float32)
  classes = np.full((n, max_boxes), -1, np.int32)
  boxes[:, :stored] = data["boxes"]
  classes[:, :stored] = data["classes"]
  return {"images": data["image"], "captions": np.array([c.decode() for c in data["caption"]]),
          "layout_boxes": boxes, "layout_classes": classes}


def attributes_list(split_arrays: Dict[str, np.ndarray]) -> List[dict]:
  """Per-example attribute dicts in the form `evaluation.caption_fidelity` expects."""
  return [{"color": c, "shape": s, "position": p} for c, s, p in
          zip(split_arrays["color"], split_arrays["shape"], split_arrays["position"])]
