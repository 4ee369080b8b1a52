"""Stage 1 of Stable Diffusion: the kl-f8 autoencoder (diffusers AutoencoderKL, SD's VAE layout).

  python train.py --config configs/sd_vae_f8.py --workdir workdirs/sd_vae_f8 \
      --config.autoencoder.lpips_weights=lpips_vgg.safetensors

Losses as in LDM's first_stage_models/kl-f8 config: L1 + LPIPS (weight 1) with a learned output
log-variance, KL weight 1e-6, PatchGAN hinge loss with the adaptive weight (disc_weight 0.5) from
step 50001 on. Adam(0.5, 0.9) at LDM's base rate 4.5e-6 times the global batch, no clipping, no EMA.
LPIPS weights come from `python -m latent_diffusion_jax.interop.lpips` (nothing is
downloaded). The embedded shapes data is the only image source wired up so far; real training
needs an image dataset in `data`.
Arguments: `tiny` (same structure, a few thousand times smaller, no LPIPS: a 2-step smoke run).
"""

from latent_diffusion_jax.core.config import (base_config, first_stage_smoke_run,
                                         ldm_first_stage_training, parse_arg)


def get_config(arg=None):
  args = parse_arg(arg, tiny=False)
  c = base_config()
  c.stage = "autoencoder"
  m = c.model
  m.image_size = 256
  # SD's VAE: ch 128, ch_mult (1, 2, 4, 4), 2 res blocks, 4 latent channels, mid-block attention.
  m.vae.block_out_channels = (128, 256, 512, 512)
  m.vae.layers_per_block = 2
  m.vae.latent_channels = 4
  m.vae.norm_num_groups = 32
  m.text_encoder.kind = "none"

  a = c.autoencoder
  a.kind = "kl"
  a.kl_weight = 1e-6
  a.perceptual_weight = 1.0
  a.disc_start = 50001
  a.disc_weight = 0.5
  a.disc_factor = 1.0
  a.disc_loss = "hinge"
  a.disc_channels = 64
  a.disc_num_layers = 3

  ldm_first_stage_training(c)
  if args.tiny:
    m.image_size = 32
    m.vae.block_out_channels = (16, 32, 32, 32)
    m.vae.layers_per_block = 1
    m.vae.norm_num_groups = 8
    a.disc_channels = 8
    a.disc_num_layers = 2
    first_stage_smoke_run(c)
  return c
