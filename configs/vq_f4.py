"""Stage 1 of the LDM paper's VQ models: vq-f4 (embed_dim 3, 8192 codes; diffusers VQModel layout).

  python train.py --config configs/vq_f4.py --workdir workdirs/vq_f4 \
      --config.autoencoder.lpips_weights=lpips_vgg.safetensors

As LDM's first_stage_models/vq-f4 config: ch 128, ch_mult (1, 2, 4), 2 res blocks, 3 latent
channels, codebook 8192 x 3 with commitment beta 0.25 and codebook weight 1, L1 + LPIPS, PatchGAN
hinge loss with the adaptive weight (disc_weight 0.75) from the first step. Adam(0.5, 0.9) at
4.5e-6 times the global batch. `--config.autoencoder.vq_ema_decay=0.99` swaps the codebook loss for
EMA codebook updates.
Stage 2 on this first stage: its config describes it with the same keys (autoencoder.kind="vq",
num_vq_embeddings, vq_embed_dim and model.vae; `core.config.copy_first_stage(c, <this config>)`
copies them) and sets the UNet's in/out channels to 3, with --config.frozen.vae=workdirs/vq_f4.
It then trains on the pre-quantization latents (encoder + quant_conv, scaled by 1/std from
stage1.json), and sampling decodes them through the quantizer; configs/shapes_ldm_vq.py does this
for the embedded shapes demo. A frozen.vae of another kind or shape stops stage 2 naming the key.
Arguments: `tiny` (same structure, tiny widths and codebook, no LPIPS: a 2-step smoke run).
"""

from latent_diffusion_jax.core.config import (base_config, first_stage_smoke_run,
                                         ldm_first_stage_training, parse_arg)


def get_config(arg=None):
  args = parse_arg(arg, tiny=False)
  c = base_config()
  c.stage = "autoencoder"
  m = c.model
  m.image_size = 256
  m.vae.block_out_channels = (128, 256, 512)
  m.vae.layers_per_block = 2
  m.vae.latent_channels = 3
  m.vae.norm_num_groups = 32
  m.text_encoder.kind = "none"

  a = c.autoencoder
  a.kind = "vq"
  a.num_vq_embeddings = 8192
  a.vq_embed_dim = 3
  a.vq_beta = 0.25
  a.codebook_weight = 1.0
  a.perceptual_weight = 1.0
  # taming's VQ loss has no output log-variance.
  a.learn_logvar = False
  a.disc_start = 0
  a.disc_weight = 0.75
  a.disc_loss = "hinge"
  a.disc_channels = 64
  a.disc_num_layers = 3

  ldm_first_stage_training(c)
  if args.tiny:
    m.image_size = 32
    m.vae.block_out_channels = (16, 32, 32)
    m.vae.layers_per_block = 1
    m.vae.norm_num_groups = 8
    a.num_vq_embeddings = 64
    a.disc_channels = 8
    a.disc_num_layers = 2
    first_stage_smoke_run(c)
  return c
