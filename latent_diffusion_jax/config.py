"""The base config: every key any experiment may set is declared here, with its default.

Experiment files under `configs/` call `base_config()`, override fields, and return the result from
`get_config(arg)`. Overrides on the command line: `--config.optimizer.learning_rate=1e-4`.
"""

import importlib.util
import os

import ml_collections as mc

from latent_diffusion_jax.parallel import DEFAULT_LOGICAL_AXIS_RULES


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
  # Which trainer runs the config: "diffusion" (stage 2) or "autoencoder" (stage 1).
  c.stage = "diffusion"
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
  # Optimize the text encoder with the UNet (the LDM paper's conditioner); SD keeps CLIP frozen.
  c.model.text_encoder.trainable = False
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
  # Per-example loss weights: "uniform" or "min_snr" (min-SNR-gamma, Hang et al. 2023).
  c.diffusion.loss_weighting = "uniform"
  c.diffusion.min_snr_gamma = 5.0
  # Offset noise strength (per-channel constant added to the noise); 0 disables it.
  c.diffusion.offset_noise = 0.0
  # Probability of training on the empty prompt, for classifier-free guidance.
  c.diffusion.caption_dropout = 0.1

  c.autoencoder = mc.ConfigDict()
  # Weight of KL(q(z|x) || N(0, I)) against the summed L1 reconstruction error (LDM: ~1e-6).
  c.autoencoder.kl_weight = 1e-6
  # Extra squared-error term on top of L1.
  c.autoencoder.l2_weight = 0.0

  c.optimizer = mc.ConfigDict()
  c.optimizer.learning_rate = 1e-4
  c.optimizer.warmup_steps = 500
  # After warmup: "constant" or "cosine" (decays to end_learning_rate_factor * learning_rate).
  c.optimizer.schedule = "constant"
  c.optimizer.end_learning_rate_factor = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  # Decoupled weight decay, applied to kernels and embeddings only (not biases or norm scales).
  c.optimizer.weight_decay = 1e-2
  # Global-norm gradient clipping; <= 0 disables it.
  c.optimizer.grad_clip_norm = 1.0
  # Micro-batches accumulated per optimizer update (each of training.batch_size examples).
  c.optimizer.grad_accum_steps = 1
  # EMA of the trained params: decay, warmed up as min(decay, (1 + n) / (10 + n)); <= 0 disables it.
  c.optimizer.ema_decay = 0.9999

  c.training = mc.ConfigDict()
  # Global batch size (all hosts together) of one micro-batch.
  c.training.batch_size = 256
  c.training.num_steps = 100_000
  c.training.log_every = 50
  c.training.checkpoint_every = 1000
  c.training.keep_checkpoints = 3
  c.training.async_checkpointing = True
  # Fixed-seed sample grid written to the logs every N steps; 0 disables it.
  c.training.sample_every = 5000
  # Where training starts when the workdir has no checkpoint: "" (scratch) or another workdir.
  c.training.init_checkpoint = ""
  # What a non-finite loss or gradient does: "halt" (stop, keeping the last good checkpoint) or
  # "skip" (drop the update and count it).
  c.training.nonfinite_policy = "halt"
  # Number of timestep buckets for the loss-per-timestep diagnostic.
  c.training.loss_buckets = 10
  # Batches used to estimate the latent scale factor when model.latent_scale_factor <= 0.
  c.training.scale_estimate_batches = 4

  c.frozen = mc.ConfigDict()
  # The first stage: a stage-1 workdir of ours, a diffusers AutoencoderKL directory, or "" for a
  # randomly initialized one (tests only).
  c.frozen.vae = ""
  # The frozen text encoder (kind "clip"): a transformers CLIPTextModel directory, or "" for random.
  c.frozen.text_encoder = ""
  # Tokenizer directory (CLIP layout); "" builds the embedded dataset's word tokenizer.
  c.frozen.tokenizer = ""
  # Accept pickle (.bin/.ckpt) weights; they can run code when loaded.
  c.frozen.allow_pickle = False

  c.data = mc.ConfigDict()
  # "shapes": the embedded captioned-shapes dataset (generated locally, no download).
  c.data.kind = "shapes"
  c.data.num_train = 20000
  c.data.num_test = 512
  # Where TFDS datasets are prepared; "" means <workdir>/tfds.
  c.data.data_dir = ""
  # Stage 2: encode the dataset once with the frozen VAE and train on the stored moments, instead
  # of running the encoder in every step.
  c.data.pre_encode = True

  c.mesh = mc.ConfigDict()
  # Sizes of the (data, fsdp, tensor) axes; one -1 takes the remaining devices.
  c.mesh.shape = (-1, 1, 1)
  # Logical axis name -> mesh axes; see parallel.py for what each name covers.
  c.mesh.logical_axis_rules = DEFAULT_LOGICAL_AXIS_RULES

  c.sampling = mc.ConfigDict()
  c.sampling.sampler = "ddim"
  c.sampling.num_steps = 50
  c.sampling.guidance_scale = 7.5
  c.sampling.eta = 0.0
  # Prompts of the fixed-seed sample grid logged during training.
  c.sampling.prompts = ("a photograph of an astronaut riding a horse",)
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
