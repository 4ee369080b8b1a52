"""Stage 1 of the embedded default with a VQ first stage: a small VQ-f4 autoencoder on 32x32 shapes.

  python train.py --config configs/shapes_vq_autoencoder.py --workdir workdirs/shapes_vq_ae

The LDM paper's VQ-regularized f4 first stage at the size of configs/shapes_autoencoder.py: the
same encoder/decoder (32x32x3 images -> 8x8 latents), 3 latent channels (vq-f4's z_channels and
embed_dim), 512 codes updated by EMA. Stage 2 trains on the pre-quantization latents
(configs/shapes_ldm_vq.py); decoding quantizes them. The held-out PSNR / SSIM and the latent scale
factor (1/std of the pre-quantization latents) go to <workdir>/stage1.json.

Measured on the 512 held-out images (2 loaded CPU cores), with the caption-fidelity detector run
on the reconstructions (the ceiling for stage 2's samples; originals score 100%):
  EMA codebook, 1200 steps (this config)   30.81 dB, SSIM 0.955, color 98.2%, 164 codes in use
  EMA codebook, 850 steps                  27.60 dB, SSIM 0.915, color 94.3% (cyan <-> blue)
  codebook loss (vq_ema_decay=0), 850      25.95 dB, SSIM 0.922, color 53.5%, 320 codes in use
Arguments: `tiny` (a 2-step smoke run on 64 images, for tests).
"""

import os

from latent_diffusion_jax.core.config import load_config_file, parse_arg

_HERE = os.path.dirname(os.path.abspath(__file__))


def first_stage(c) -> None:
  """The first stage's description, shared with the stage-2 config (configs/shapes_ldm_vq.py),
  which must build the same VQModel to decode its latents."""
  m, a = c.model, c.autoencoder
  m.image_size = 32
  m.vae.block_out_channels = (32, 64, 64)
  m.vae.layers_per_block = 1
  m.vae.norm_num_groups = 16
  m.vae.latent_channels = 3
  a.kind = "vq"
  a.num_vq_embeddings = 512
  a.vq_embed_dim = 3


def get_config(arg=None):
  args = parse_arg(arg, tiny=False)
  # The KL demo's schedule, optimizer and discriminator (configs/shapes_autoencoder.py); the VQ
  # model, its loss and a longer run differ.
  c = load_config_file(os.path.join(_HERE, "shapes_autoencoder.py") + (":tiny" if args.tiny else ""))
  first_stage(c)
  # Measured on the single-shape images (BENCHMARKS.md, `make demo-vq`); the KL demo's stage 1
  # moved to the multi-shape layout images after that run.
  c.data.shapes_variant = "single"
  a = c.autoencoder
  a.vq_beta = 0.25
  a.codebook_weight = 1.0
  a.vq_ema_decay = 0.99
  # taming's VQ loss has no output log-variance.
  a.learn_logvar = False
  if args.tiny:
    a.num_vq_embeddings = 64
  else:
    # A gentle adversarial term for the last sixth of the run, as in the KL demo.
    a.disc_start = 1001
    c.training.num_steps = 1200
  return c
