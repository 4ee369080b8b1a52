"""An inpainting LDM on the embedded shapes: the demo's text-to-image model (configs/shapes_ldm.py)
with the mask and the masked image's latents concatenated to the UNet's input (4 + 1 + 4 = 9
channels, the SD inpainting layout), on the conditioning demos' first stage (configs/shapes_autoencoder.py:layouts).

  python train.py --config configs/shapes_inpaint_ldm.py --workdir workdirs/demo/inpaint \
      --config.data.data_dir=workdirs/demo/tfds --config.frozen.vae=workdirs/demo/autoencoder_layouts
Masks (random rectangles and strokes, the whole image for a quarter of the examples) are drawn in
the train step; sample with `sampling.image_conditioned.inpaint`.
Measured 2026-11-29 (`make demo-inpaint`'s evaluator, 96 held-out images, the shape's quadrant
masked): color and shape there 97.9%; outside the mask 56.33 dB from the model, the input's own
pixels with `--keep_unmasked` (BENCHMARKS.md).
Arguments: `tiny` (a 2-step smoke run on a smaller UNet and a random autoencoder, for tests).
"""

import os

from latent_diffusion_jax.core.config import image_conditioned_shapes, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, tiny=False)
  c = image_conditioned_shapes(os.path.dirname(os.path.abspath(__file__)), "inpainting", args.tiny)
  ic = c.model.image_conditioning
  # model.unet.in_channels stays at the latent's 4: the conditioning widens it to 9.
  ic.mask.full_mask_prob = 0.25
  ic.mask.max_boxes = 2
  ic.mask.max_strokes = 2
  return c
