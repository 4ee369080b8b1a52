"""TFDS builder for the captioned shapes dataset, generated locally with no download.

Prepare it once into a data_dir under the workdir and read it like any TFDS dataset:

  builder = CaptionedShapes(data_dir=f"{workdir}/tfds")   # config "default"
  builder.download_and_prepare(download_dir=f"{workdir}/tfds/downloads")
  ds = builder.as_dataset(split="train")

Configs: "default" (32x32, 20000 train / 512 test, captions without size words) and "sized"
(same with "small"/"large" in the captions). `make_config` builds others; its name encodes every
field, so datasets of different sizes never share a directory.

Features: "image" uint8 [S, S, 3], "caption" text, and "color", "shape", "position", "size" as
class labels over `shapes.COLORS`, `shapes.SHAPES`, `shapes.POSITIONS`, `shapes.SIZES`.
"train" draws from the 60 non-held-out (color, shape, position) combinations, "test" only from
the 12 in `shapes.HELD_OUT_COMBINATIONS`. An example's class (`shapes.class_index`) follows from
its color and shape.

`ShapeLayouts` (with `make_layout_config`) is the layout variant: 1 to 3 shapes with boxes.
"""

import dataclasses
import importlib.resources.abc
import sys

import numpy as np
import tensorflow_datasets as tfds

from latent_diffusion_jax.data import shapes, shapes_layout

# tensorflow-datasets 4.9.10 imports the `importlib_resources` backport to locate a builder's code,
# but declares it only for Python < 3.9; the standard library has the same `abc.Traversable`.
try:
  import importlib_resources  # noqa: F401
except ImportError:
  sys.modules["importlib_resources"] = importlib.resources


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """What to generate.

  Attributes:
    image_size: image side in pixels, at least 16.
    num_train: examples in "train".
    num_test: examples in "test".
    include_size: whether captions name the size ("a large red ...").
    seed: dataset seed; example i of a split depends only on (seed, split, i).
  """
  image_size: int = 32
  num_train: int = 20000
  num_test: int = 512
  include_size: bool = False
  seed: int = 0


def make_config(num_train: int = 20000, num_test: int = 512, image_size: int = 32,
                include_size: bool = False, seed: int = 0) -> ShapesConfig:
  """A config whose name encodes all its fields, e.g. "s32_train20000_test512_seed0".

  Args:
    num_train: examples in "train".
    num_test: examples in "test".
    image_size: image side in pixels.
    include_size: whether captions name the size.
    seed: dataset seed.

  Returns:
    A `ShapesConfig` to pass as `CaptionedShapes(config=...)`.
  """
  sized = "_sized" if include_size else ""
  name = f"s{image_size}_train{num_train}_test{num_test}_seed{seed}{sized}"
  return ShapesConfig(name=name, image_size=image_size, num_train=num_train, num_test=num_test,
                      include_size=include_size, seed=seed,
                      description=f"{num_train} train / {num_test} test, {image_size}px")


class CaptionedShapes(tfds.core.GeneratorBasedBuilder):
  """Captioned images of one colored shape, with held-out combinations as the test split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      ShapesConfig(name="default", description="32x32, captions without size words."),
      ShapesConfig(name="sized", include_size=True,
                   description="32x32, captions name the size (small/large)."),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        description="Captioned 1-shape images; the test split holds out 12 combinations.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3)),
            "caption": tfds.features.Text(),
            "color": tfds.features.ClassLabel(names=list(shapes.COLORS)),
            "shape": tfds.features.ClassLabel(names=list(shapes.SHAPES)),
            "position": tfds.features.ClassLabel(names=list(shapes.POSITIONS)),
            "size": tfds.features.ClassLabel(names=list(shapes.SIZES)),
        }),
        supervised_keys=("image", "caption"),
    )

  def _split_generators(self, dl_manager):
    # Everything is synthesized, so the download manager is never used.
    del dl_manager
    config = self.builder_config
    return {"train": self._generate_examples("train", config.num_train),
            "test": self._generate_examples("test", config.num_test)}

  def _generate_examples(self, split: str, count: int):
    config = self.builder_config
    for index in range(count):
      image, caption, attributes = shapes.generate_example(
          index, split=split, seed=config.seed, image_size=config.image_size,
          include_size=config.include_size)
      yield index, {"image": image, "caption": caption,
                    **{key: attributes[key] for key in ("color", "shape", "position", "size")}}


@dataclasses.dataclass(eq=False)
class LayoutConfig(tfds.core.BuilderConfig):
  """What to generate for the layout variant (fields as in `ShapesConfig`)."""
  image_size: int = 32
  num_train: int = 20000
  num_test: int = 512
  seed: int = 0


def make_layout_config(num_train: int = 20000, num_test: int = 512, image_size: int = 32,
                       seed: int = 0) -> LayoutConfig:
  """A `LayoutConfig` whose name encodes all its fields, e.g. "s32_train20000_test512_seed0"."""
  name = f"s{image_size}_train{num_train}_test{num_test}_seed{seed}"
  return LayoutConfig(name=name, image_size=image_size, num_train=num_train, num_test=num_test,
                      seed=seed, description=f"{num_train} train / {num_test} test, {image_size}px")


class ShapeLayouts(tfds.core.GeneratorBasedBuilder):
  """Images of 1 to 3 colored shapes with their boxes and classes (data/shapes_layout.py).

  Features: "image" uint8 [S, S, 3], "caption" text ("a red circle and a blue square"),
  "num_objects" int32, "boxes" float32 [3, 4] (x0, y0, x1, y1 in image fractions) and "classes"
  int32 [3] (`shapes.class_index`), rows past num_objects zero boxes and class -1. "test" layouts
  each hold an object whose (color, shape, grid cell) "train" never shows.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [LayoutConfig(name="default", description="32x32, 1 to 3 boxed shapes.")]

  def _info(self) -> tfds.core.DatasetInfo:
    size, m = self.builder_config.image_size, shapes_layout.MAX_OBJECTS
    return self.dataset_info_from_configs(
        description="1 to 3 shapes with boxes; the test split holds unseen layouts.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3)),
            "caption": tfds.features.Text(),
            "num_objects": tfds.features.Scalar(dtype=np.int32),
            "boxes": tfds.features.Tensor(shape=(m, 4), dtype=np.float32),
            "classes": tfds.features.Tensor(shape=(m,), dtype=np.int32),
        }),
        supervised_keys=("image", "caption"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is synthesized
    config = self.builder_config
    return {"train": self._generate_examples("train", config.num_train),
            "test": self._generate_examples("test", config.num_test)}

  def _generate_examples(self, split: str, count: int):
    config = self.builder_config
    for index in range(count):
      image, caption, objects = shapes_layout.generate_example(
          index, split=split, seed=config.seed, image_size=config.image_size)
      boxes, classes = shapes_layout.layout_arrays(objects)
      yield index, {"image": image, "caption": caption, "num_objects": len(objects),
                    "boxes": boxes, "classes": classes}
