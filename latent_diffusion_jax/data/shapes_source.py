"""The embedded captioned-shapes dataset as arrays: images, captions, attributes and token ids.

Generated with the TFDS builder into `<data_dir>` on first use (about a minute for 20000 images),
then read back; no download happens.
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
  return {
      "images": data["image"],
      "captions": np.array([c.decode() for c in data["caption"]]),
      "color": names("color", list(shapes.COLORS)),
      "shape": names("shape", list(shapes.SHAPES)),
      "position": names("position", list(shapes.POSITIONS)),
  }


def attributes_list(split_arrays: Dict[str, np.ndarray]) -> List[dict]:
  """Per-example attribute dicts in the form `evaluation.caption_fidelity` expects."""
  return [{"color": c, "shape": s, "position": p} for c, s, p in
          zip(split_arrays["color"], split_arrays["shape"], split_arrays["position"])]
