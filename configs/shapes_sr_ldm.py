"""A x4 super-resolution LDM on the embedded shapes, in the SD x4 upscaler's layout: the demo's
text-to-image model (configs/shapes_ldm.py) with the 8x8 low-res image (the latent's size)
concatenated to the 4 latent channels (7 in all), noised to a random level in [0, 350] that is
also the UNet's class label; on the conditioning demos' first stage
(configs/shapes_autoencoder.py:layouts; f4: 32 -> 8).

  python train.py --config configs/shapes_sr_ldm.py --workdir workdirs/demo/sr \
      --config.data.data_dir=workdirs/demo/tfds --config.frozen.vae=workdirs/demo/autoencoder_layouts
Sample with `sampling.image_conditioned.upscale(bundle, prompts, low_res, noise_level=20)`.
Measured 2026-11-29 (96 held-out images): PSNR 26.78 dB / SSIM 0.94 against bicubic's 24.19 dB /
0.87; the shape detector agrees with the ground truth on 97.9% (BENCHMARKS.md).
Arguments: `tiny` (a 2-step smoke run on a smaller UNet and a random autoencoder, for tests),
`degradation=area|bilinear|bicubic` (how low-res images are made).
"""

import os

from latent_diffusion_jax.core.config import image_conditioned_shapes, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, tiny=False, degradation="bicubic")
  c = image_conditioned_shapes(os.path.dirname(os.path.abspath(__file__)), "upscaling", args.tiny)
  ic = c.model.image_conditioning
  # 0 = the first stage's factor (4): the low-res image has the latent's size.
  ic.low_res_factor = 0
  ic.degradation = args.degradation
  # The x4 upscaler's noise augmentation: levels of its low-res schedule, also the class label.
  ic.noise_level_range = (0, 350)
  return c
