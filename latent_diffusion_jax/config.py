"""The base config: every key any experiment may set is declared here, with its default.

Experiment files under `configs/` call `base_config()`, override fields, and return the result from
`get_config(arg)`. Overrides on the command line: `--config.optimizer.learning_rate=1e-4`.
"""

import importlib.util
import os

import ml_collections as mc


def parse_arg(arg: str | None, **defaults):
  """Parses 'a=1,b,c=x' into a ConfigDict over `defaults` (bare names become True).

  Unknown keys raise, naming the valid ones.
  """
  out = mc.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; valid: {sorted(defaults)}.")
    if not _:
      out[key] = True
    elif isinstance(defaults[key], bool):
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = type(defaults[key])(value) if defaults[key] is not None else value
  return out


def base_config() -> mc.ConfigDict:
  """All keys, with the defaults of a Stable Diffusion 1.5-sized text-to-image run."""
  c = mc.ConfigDict()
  # Fixed seed: runs are reproducible unless the user changes it.
  c.seed = 0

  c.model = mc.ConfigDict()
  # Compute dtype of all networks ("float32", "bfloat16", "float16"); params stay in param_dtype.
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  # Attention kernel: "xla", "jax", "cudnn" or "auto" (see models/attention.py).
  c.model.attention_impl = "xla"
  # Image resolution in pixels; latents are image_size / 2^(len(vae.block_out_channels)-1).
  c.model.image_size = 512

  # UNet2DConditionModel fields (models/unet.py).
  c.model.unet = mc.ConfigDict(dict(
      in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
      attention_levels=(True, True, True, False), layers_per_block=2,
      num_heads=mc.FieldReference(8, field_type=object), head_dim=mc.FieldReference(None, field_type=int),
      transformer_depth=1, cross_attention_dim=768, use_linear_projection=False,
      upcast_attention=False, num_class_embeds=mc.FieldReference(None, field_type=int),
      mid_block_attention=True, norm_num_groups=32, norm_eps=1e-5, dropout=0.0, remat=False))

  # AutoencoderKL fields (models/autoencoder.py).
  c.model.vae = mc.ConfigDict(dict(
      in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
      latent_channels=4, norm_num_groups=32, use_quant_conv=True, mid_block_attention=True))
  # Latent scale factor: > 0 fixes it (SD: 0.18215); <= 0 estimates 1/std from the first batches.
  c.model.latent_scale_factor = 0.18215

  c.model.text_encoder = mc.ConfigDict()
  # "clip" (frozen, SD), "ldm_transformer" (trained jointly, LDM paper) or "none" (class labels only).
  c.model.text_encoder.kind = "clip"
  # Token sequence length (CLIP: 77).
  c.model.text_encoder.max_length = 77
  # CLIPTextModel fields (models/text_encoders.py); output_layer "last" or "penultimate".
  c.model.text_encoder.clip = mc.ConfigDict(dict(
      vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
      layer_norm_eps=1e-5, output_layer="last"))
  # LDMTextTransformer fields (the paper's jointly trained conditioner).
  c.model.text_encoder.ldm = mc.ConfigDict(dict(
      vocab_size=30522, max_length=77, width=1280, depth=32, heads=8, head_dim=64, mlp_ratio=4.0))

  c.diffusion = mc.ConfigDict()
  # Noise schedule: "linear", "scaled_linear" (SD) or "cosine".
  c.diffusion.schedule = "scaled_linear"
  c.diffusion.num_timesteps = 1000
  c.diffusion.beta_start = 0.00085
  c.diffusion.beta_end = 0.012
  # Rescale the schedule to zero terminal SNR (Lin et al. 2023); pair it with v-prediction.
  c.diffusion.rescale_zero_terminal_snr = False
  # What the UNet predicts: "epsilon", "v_prediction" or "sample".
  c.diffusion.prediction_type = "epsilon"
  return c


def tiny_models(c: mc.ConfigDict, unet_channels=(32, 64)) -> mc.ConfigDict:
  """Shrinks all three networks of `c` in place to a few hundred thousand params, same structure."""
  c.model.image_size = 32
  u = c.model.unet
  u.block_out_channels = tuple(unet_channels)
  u.attention_levels = (True,) + (False,) * (len(unet_channels) - 1)
  u.layers_per_block = 1
  u.norm_num_groups = 8
  c.model.vae.block_out_channels = (16, 32, 32)
  c.model.vae.layers_per_block = 1
  c.model.vae.norm_num_groups = 8
  clip = c.model.text_encoder.clip
  clip.vocab_size, clip.hidden_size, clip.intermediate_size = 1000, 32, 64
  clip.num_hidden_layers, clip.num_attention_heads = 2, 4
  u.cross_attention_dim = clip.hidden_size
  return c


def load_config_file(path_and_arg: str) -> mc.ConfigDict:
  """Loads `configs/x.py[:arg]` like `config_flags` does, for tools and tests that take no flags."""
  path, _, arg = path_and_arg.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No config file at {path!r}.")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()
