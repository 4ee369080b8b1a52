"""Stage 1 of the embedded default: a small f4 KL autoencoder on 32x32 images of shapes.

  python train.py --config configs/shapes_autoencoder.py --workdir workdirs/shapes_ae

prints the held-out PSNR / SSIM at the end (and stores them with the latent scale factor in
<workdir>/stage1.json); bench/stage1_psnr.py runs it and checks PSNR >= 30 dB.
Losses: L1 + L2 + KL, and the PatchGAN hinge loss with the adaptive weight from `disc_start` on.
The perceptual (LPIPS) weight is 0 here because LPIPS needs pretrained VGG16 weights, which cannot
be downloaded in this setting; with a converted file add
`--config.autoencoder.perceptual_weight=1.0 --config.autoencoder.lpips_weights=lpips_vgg.safetensors`.
Data: the layout variant of the shapes (1 to 3 shapes per image), not the single-shape captioned
images stage 2 trains on: multi-shape images show the autoencoder more small shapes and edges per
step. At the same 850 steps the single-shape data left the small shapes blurred and depended on the
seed (held-out single shapes read back by the caption-fidelity detector, `bench/stage1_ceiling.py`:
shape 87.2% / 74.2% / 88.0% for seeds 0 / 1 / 2, seed 1's color 65.1%); on the layout data
93.5% / 96.9% / 95.6%, and `make demo` scores 94.8% / 93.8% / 90.6% of images with color, position
and shape right (was 86.5% / 65.6% / 88.5%; BENCHMARKS.md, the embedded default's three seeds).
About 3 minutes on the 2-core machine.
Arguments: `tiny` (a 2-step smoke run on 64 images, for tests); `layouts` (the first stage of the
conditioning demos, `make demo-class|demo-layout|demo-inpaint|demo-sr|demo-semantic`: the same data
for 2400 steps. 39.99 dB / SSIM 0.992 on 512 held-out layouts; the shape detectors read from its
reconstructions what they read from the real images: class 99.6%, layout boxes 100%, shape of single
shapes 99.0%, where the first single-shape 850-step stage read 87.5% / 72.5% / 87.2%. About 8
minutes on the 2-core machine, once for all five.)
"""

from latent_diffusion_jax.core.config import base_config, first_stage_smoke_run, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, tiny=False, layouts=False)
  c = base_config()
  c.stage = "autoencoder"
  m = c.model
  m.image_size = 32
  # configs/shapes_ldm.py's m.vae block must match these fields.
  m.vae.block_out_channels = (32, 64, 64)
  m.vae.layers_per_block = 1
  m.vae.norm_num_groups = 16
  m.text_encoder.kind = "none"

  a = c.autoencoder
  a.kind = "kl"
  a.kl_weight = 1e-6
  a.l2_weight = 1.0
  a.perceptual_weight = 0.0
  # The adversarial term joins for the last sixth of the run, gently: its adaptive weight sits at
  # the 1e4 clip here, so disc_weight bounds its last-layer gradient to <= 5% of the L1/L2 one.
  a.disc_start = 701
  a.disc_weight = 0.05
  a.disc_loss = "hinge"
  a.disc_channels = 16
  a.disc_num_layers = 2

  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 50
  c.optimizer.schedule = "cosine"
  c.optimizer.end_learning_rate_factor = 0.1
  c.optimizer.weight_decay = 0.0
  c.optimizer.ema_decay = 0.0

  # Small batches: on 2 CPU cores, updates of 8 images reach 30 dB after fewer images than of 16 or 32;
  # at 850 steps, batch 16 instead of 8 cost 70 s more and 600 steps at batch 16 fell short.
  c.training.batch_size = 8
  c.training.num_steps = 850
  c.training.log_every = 50
  c.training.checkpoint_every = 400
  c.training.sample_every = 0
  c.data.num_train = 20000
  c.data.num_test = 512
  c.data.shapes_variant = "layout"
  if args.layouts:
    c.training.num_steps = 2400
    a.disc_start = 2151
    c.training.checkpoint_every = 1200
  if args.tiny:
    first_stage_smoke_run(c)
    c.optimizer.warmup_steps = 1
  return c
