"""Semantic map -> image on the embedded shapes: the demo's text-to-image model
(configs/shapes_ldm.py) with the segmentation map (0 background, 1 circle, 2 square, 3 triangle)
as 4 per-class channels at latent resolution, concatenated to the latents (8 channels in all); the
caption still names the color. On the demo's stage-1 autoencoder.

  python train.py --config configs/shapes_semantic_ldm.py --workdir workdirs/demo/semantic \
      --config.data.data_dir=workdirs/demo/tfds --config.frozen.vae=workdirs/demo/autoencoder
Sample with `sampling.image_conditioned.semantic_to_image(bundle, prompts, label_maps)`.
Arguments: `tiny` (a 2-step smoke run on a smaller UNet and a random autoencoder, for tests).
"""

import os

from latent_diffusion_jax.core.config import load_config_file, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, tiny=False)
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes_ldm.py")
                       + (":tiny" if args.tiny else ""))
  ic = c.model.image_conditioning
  ic.kind = "semantic"
  # Background + the 3 shapes (data/segmentation.py).
  ic.num_classes = 4
  # The demo's stage-1 autoencoder (make demo).
  c.frozen.vae = "workdirs/demo/autoencoder"
  # The grid and evaluation hooks sample text-to-image; these models need image inputs.
  c.training.sample_every = 0
  if args.tiny:
    c.frozen.vae = ""  # a random autoencoder of the demo's layout
    c.model.unet.block_out_channels = (32, 64)
    c.model.unet.attention_levels = (True, False)
    c.data.num_train, c.data.num_test = 32, 8
  return c
