"""Semantic map -> image on the embedded shapes: the demo's text-to-image model
(configs/shapes_ldm.py) with the segmentation map (0 background, 1 + color index * 3 + shape
index: 19 classes, so the map alone fixes color, shape and place) as per-class shares of each
latent cell, concatenated to the latents (4 + 19 = 23 channels). On the conditioning demos' first stage
(configs/shapes_autoencoder.py:layouts); the caption stays an input (give "" or the caption).

  python train.py --config configs/shapes_semantic_ldm.py --workdir workdirs/demo/semantic \
      --config.data.data_dir=workdirs/demo/tfds --config.frozen.vae=workdirs/demo/autoencoder_layouts
Sample with `sampling.image_conditioned.semantic_to_image(bundle, prompts, label_maps)`.
Measured 2026-11-29 (96 held-out maps): 99.4% of shape pixels take the map's color (BENCHMARKS.md).
Arguments: `tiny` (a 2-step smoke run on a smaller UNet and a random autoencoder, for tests).
"""

import os

from latent_diffusion_jax.core.config import image_conditioned_shapes, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, tiny=False)
  c = image_conditioned_shapes(os.path.dirname(os.path.abspath(__file__)), "semantic", args.tiny)
  ic = c.model.image_conditioning
  # Background + 6 colors x 3 shapes (data/segmentation.py); "shape" (4) or "color" (7) map less.
  ic.segmentation = "color_shape"
  ic.num_classes = 19
  return c
