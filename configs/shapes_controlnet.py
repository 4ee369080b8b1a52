"""A ControlNet on the embedded demo's text-to-image LDM: shape outlines place the shape.

The base is `make demo`'s stage 2 (configs/shapes_ldm.py, trained into workdirs/demo/ldm); this
config repeats its model keys (the ControlNet copies that UNet) and trains only the ControlNet, on
outline maps computed from each training shape, with captions that never name the position.
  python train.py --config configs/shapes_controlnet.py --workdir workdirs/demo/controlnet \
      --config.training.base_checkpoint=workdirs/demo/ldm
  python -m latent_diffusion_jax.cli.placement --controlnet workdirs/demo/controlnet \
      --out workdirs/demo/placement
Arguments: `tiny` (2 steps on 64 images, for tests; pair it with a base of shapes_ldm's tiny
models), `control=segmentation` (filled masks instead of outlines).
"""

import os

from latent_diffusion_jax.core.config import load_config_file, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, tiny=False, control="outline")
  # The base's model keys: the ControlNet copies that UNet, and the run's readers rebuild it.
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes_ldm.py")
                       + (":tiny" if args.tiny else ""))
  c.stage = "controlnet"
  # The base model: the demo's stage-2 workdir (or any source the loader reads).
  c.training.base_checkpoint = "workdirs/demo/ldm"
  # The base's text encoder is frozen here; it was trained with its UNet in stage 2.
  c.model.text_encoder.trainable = False
  # The f4 first stage: 32x32 control images -> 8x8, the latent size (two halvings).
  c.model.controlnet.conditioning_channels = 3
  c.model.controlnet.conditioning_embedding_out_channels = (16, 32, 64)

  c.data.control = args.control
  c.data.drop_position_words = True
  c.training.control_caption_dropout = 0.5

  c.optimizer.learning_rate = 1e-4 if args.tiny else 3e-4
  c.optimizer.warmup_steps = 1 if args.tiny else 20
  c.optimizer.schedule = "constant"
  c.optimizer.weight_decay = 0.0
  c.optimizer.ema_decay = 0.99
  if not args.tiny:
    c.training.batch_size = 32
    c.training.num_steps = 400
    c.training.log_every = 25
    c.training.checkpoint_every = 100
  c.training.sample_every = 0
  return c
