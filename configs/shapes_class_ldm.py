"""Class-conditional LDM on the embedded shapes dataset: one of 18 classes (color x shape) per image.

The LDM paper's class-conditional setting on CPU scale: the class embedder (a learned embedding
per class plus a null class for guidance, models/conditioners/) conditions the UNet of
configs/shapes_ldm.py by cross-attention; the shape's position (grid cell and offset) and size
are left to chance. Stage 1 is the conditioning demos' autoencoder
(configs/shapes_autoencoder.py:layouts; `make demo-class` trains both):
  python train.py --config configs/shapes_autoencoder.py:layouts --workdir workdirs/demo/autoencoder_layouts \
      --config.data.data_dir=workdirs/demo/tfds
  python train.py --config configs/shapes_class_ldm.py --workdir workdirs/demo/class_ldm \
      --config.frozen.vae=workdirs/demo/autoencoder_layouts --config.data.data_dir=workdirs/demo/tfds
  python -m latent_diffusion_jax.evaluation.shapes_demo --task class \
      --checkpoint workdirs/demo/class_ldm --out workdirs/demo/class_fidelity
Measured 2026-11-29 (v-prediction, lr 2e-3, the demo's UNet; 8 images per class, 50 DDIM steps):
class (color and shape) 97.9% with guidance 3, 80.6% without; 96.5% at step 500 (BENCHMARKS.md).
Arguments: `tiny` (a 2-step smoke run on 64 images, for tests).
"""

import os

from latent_diffusion_jax.core.config import load_config_file, parse_arg
from latent_diffusion_jax.data import shapes

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  args = parse_arg(arg, tiny=False)
  c = load_config_file(os.path.join(_HERE, "shapes_ldm.py") + (":tiny" if args.tiny else ""))
  c.data.shapes_variant = "single"
  cond = c.model.conditioner
  cond.kind = "class"
  cond.num_classes = shapes.NUM_CLASSES
  # Sampling by name: "red circle" is class 0 (data/shapes.py class_index).
  cond.class_names = shapes.class_names()
  # No text: the class is the whole condition.
  c.model.text_encoder.kind = "none"
  # Labels dropped to the null class this often, so guidance has an unconditional model.
  c.diffusion.caption_dropout = 0.1
  c.sampling.prompts = ()
  return c
