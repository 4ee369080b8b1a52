"""Stage 1 of the embedded default: a small f4 KL autoencoder on 32x32 captioned shapes.

  python train.py --config configs/shapes_autoencoder.py --workdir workdirs/shapes_ae
Arguments: `tiny` (a 2-step smoke run on 64 images, for tests).
"""

from latent_diffusion_jax.config import base_config, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, tiny=False)
  c = base_config()
  c.stage = "autoencoder"
  m = c.model
  m.image_size = 32
  m.vae.block_out_channels = (32, 64, 64)
  m.vae.layers_per_block = 1
  m.vae.norm_num_groups = 16
  m.text_encoder.kind = "none"

  c.autoencoder.kl_weight = 1e-6
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.schedule = "cosine"
  c.optimizer.end_learning_rate_factor = 0.1
  c.optimizer.weight_decay = 0.0
  c.optimizer.ema_decay = 0.0

  c.training.batch_size = 32
  c.training.num_steps = 1200
  c.training.log_every = 50
  c.training.checkpoint_every = 400
  c.training.sample_every = 0
  c.data.num_train = 20000
  c.data.num_test = 512
  if args.tiny:
    c.training.batch_size = 8
    c.training.num_steps = 2
    c.training.log_every = 1
    c.training.checkpoint_every = 1
    c.optimizer.warmup_steps = 1
    c.data.num_train = 64
    c.data.num_test = 16
  return c
