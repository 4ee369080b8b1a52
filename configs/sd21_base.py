"""Stable Diffusion 2.1: 866M UNet (head dim 64, linear projections), f8 KL VAE, OpenCLIP ViT-H text.

The text encoder keeps 23 of OpenCLIP ViT-H's 24 layers (SD 2 conditions on the penultimate layer),
as diffusers' SD 2 text_encoder does.
  python -m latent_diffusion_jax.cli.summary --config configs/sd21_base.py        # 512 px, epsilon
  python -m latent_diffusion_jax.cli.summary --config configs/sd21_base.py:768-v  # 768 px, v-prediction
Arguments (comma separated): `768-v` for the 768 px v-prediction model (which upcasts attention),
`tiny` for small networks of the same structure.
"""

from latent_diffusion_jax.core.config import base_config, parse_arg, tiny_models


def get_config(arg=None):
  args = parse_arg(arg, **{"768-v": False, "tiny": False})
  c = base_config()
  u = c.model.unet
  u.num_heads = None
  u.head_dim = 64
  u.use_linear_projection = True
  u.cross_attention_dim = 1024
  clip = c.model.text_encoder.clip
  clip.hidden_size, clip.intermediate_size = 1024, 4096
  clip.num_hidden_layers, clip.num_attention_heads, clip.hidden_act = 23, 16, "gelu"
  if args["768-v"]:
    c.model.image_size = 768
    u.upcast_attention = True
    c.diffusion.prediction_type = "v_prediction"
  if args.tiny:
    tiny_models(c, unet_channels=(64, 128))
    u.norm_num_groups = 16
  return c
