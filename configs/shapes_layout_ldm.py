"""Layout-to-image LDM on the embedded shapes dataset: 1 to 3 boxes with classes per image.

The LDM paper's layout-to-image setting on CPU scale: each box becomes a token of its class and
quantized coordinates, read by a trained transformer (the layout conditioner,
models/conditioners/layout.py), whose output the UNet of configs/shapes_ldm.py attends to. The
data is the layout variant of the shapes dataset (data/shapes_layout.py); its "test" layouts each
hold an object whose (color, shape, grid cell) training never showed. Stage 1 is the conditioning
demos' autoencoder (configs/shapes_autoencoder.py:layouts; `make demo-layout` trains both):
  python train.py --config configs/shapes_layout_ldm.py --workdir workdirs/demo/layout_ldm \
      --config.frozen.vae=workdirs/demo/autoencoder_layouts --config.data.data_dir=workdirs/demo/tfds
  python -m latent_diffusion_jax.evaluation.shapes_demo --task layout \
      --checkpoint workdirs/demo/layout_ldm --out workdirs/demo/layout_fidelity
Measured 2026-11-29 (96 held-out layouts, 186 boxes, 50 DDIM steps, guidance 3): the requested color
and shape inside the box for 91.4% of boxes (color 97.8%) after 1000 steps; 71.0% after 700
(BENCHMARKS.md).
Arguments: `tiny` (a 2-step smoke run on 64 images, for tests).
"""

import os

from latent_diffusion_jax.core.config import load_config_file, parse_arg
from latent_diffusion_jax.data import shapes

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  args = parse_arg(arg, tiny=False)
  c = load_config_file(os.path.join(_HERE, "shapes_ldm.py") + (":tiny" if args.tiny else ""))
  c.data.shapes_variant = "layout"
  cond = c.model.conditioner
  cond.kind = "layout"
  cond.num_classes = shapes.NUM_CLASSES
  cond.class_names = shapes.class_names()
  layout = cond.layout
  layout.max_boxes = 3
  # Coordinates quantized to 32 bins: one per pixel of the 32 px images.
  layout.num_bins = 32
  layout.width = 64
  layout.depth = 2
  layout.heads = 4
  layout.head_dim = 16
  c.model.text_encoder.kind = "none"
  # Layouts dropped to the empty layout this often, so guidance has an unconditional model.
  c.diffusion.caption_dropout = 0.1
  c.sampling.prompts = ()
  if not args.tiny:
    # Layouts need more steps than captions: 71.0% of boxes right at 700, 91.4% at 1000.
    c.training.num_steps = 1000
  return c
