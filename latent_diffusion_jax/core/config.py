"""The base config: every key any experiment may set is declared here, with its default.

Experiment files under `configs/` call `base_config()`, override fields, and return the result from
`get_config(arg)`. Overrides on the command line: `--config.optimizer.learning_rate=1e-4`.
"""

import importlib.util
import json
import os

import ml_collections as mc

from latent_diffusion_jax.core.parallel import DEFAULT_LOGICAL_AXIS_RULES
from latent_diffusion_jax.core.errors import UserInputError, MissingInputError


def parse_arg(arg: str | None, **defaults):
  """Parses 'a=1,b,c=x' into a ConfigDict over `defaults` (bare names become True).

  Unknown keys raise, naming the valid ones.
  """
  out = mc.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise UserInputError(f"Unknown config argument {key!r}; valid: {sorted(defaults)}.")
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
  # Which stage trains (training/stages/): "diffusion" (stage 2) or "autoencoder" (stage 1).
  c.stage = "diffusion"
  # Fixed seed: runs are reproducible unless the user changes it.
  c.seed = 0

  c.model = mc.ConfigDict()
  # Compute dtype of all networks ("float32", "bfloat16", "float16"); params stay in param_dtype.
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  # Attention kernel: "xla", "jax", "cudnn", "chunked" or "auto" (see models/attention.py); "auto"
  # is cuDNN flash attention on GPUs in half precision, on CPUs "chunked" from 128x128 tokens of
  # logits per image-head up (SD's levels and their cross-attention) and "xla" below that (the
  # embedded demos' 8x8 latents, text encoders), else "jax".
  c.model.attention_impl = "auto"
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
  # Token sequence length (CLIP: 77): the tokenizer's padding, the encoder's learned positions and
  # the latent shards' stored ids all follow this one key.
  c.model.text_encoder.max_length = 77
  # Optimize the text encoder with the UNet (the LDM paper's conditioner); SD keeps CLIP frozen.
  c.model.text_encoder.trainable = False
  # CLIPTextModel fields (models/text_encoders.py); output_layer "last" or "penultimate".
  c.model.text_encoder.clip = mc.ConfigDict(dict(
      vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
      num_attention_heads=12, hidden_act="quick_gelu",
      layer_norm_eps=1e-5, output_layer="last"))
  # LDMTextTransformer fields (the paper's jointly trained conditioner).
  c.model.text_encoder.ldm = mc.ConfigDict(dict(
      vocab_size=30522, width=1280, depth=32, heads=8, head_dim=64, mlp_ratio=4.0))

  # What the UNet is conditioned on (models/conditioners/): the LDM paper's tau_theta, chosen by
  # name. "" follows model.text_encoder.kind (text: "clip" frozen, "ldm_transformer" trained;
  # "none": unconditional). "class": a learned embedding per class label (batch field
  # "class_labels"), read by cross-attention and, with use_unet_class_embedding, also added to
  # the time embedding through the UNet's class embedding (diffusers' num_class_embeds).
  # "layout": boxes with classes ("layout_boxes", "layout_classes") as tokens of class and
  # quantized coordinates through a trained transformer. "precomputed": embeddings of any external
  # encoder stored with the data ("embeddings" [L, D]). Any other name is a conditioner registered
  # by the file or module in `module` (see docs/CONDITIONING.md).
  c.model.conditioner = mc.ConfigDict()
  c.model.conditioner.kind = ""
  # A Python file or module imported before the conditioner is built (user conditioners).
  c.model.conditioner.module = ""
  # "class" and "layout": number of classes and (optional) their names, for sampling by name.
  c.model.conditioner.num_classes = 0
  c.model.conditioner.class_names = ()
  # "class": the learned embedding as cross-attention context (the paper); and/or the label
  # through the UNet's class embedding (num_class_embeds = num_classes + 1, the last the null
  # class), which diffusers' UNet2DConditionModel can express (export needs class_context=False).
  c.model.conditioner.class_context = True
  c.model.conditioner.use_unet_class_embedding = False
  c.model.conditioner.layout = mc.ConfigDict(dict(
      max_boxes=3, num_bins=32, width=128, depth=2, heads=4, head_dim=32))
  # "precomputed": the stored embeddings' width and sequence length.
  c.model.conditioner.precomputed = mc.ConfigDict(dict(width=768, length=77))

  # ControlNet (models/controlnet.py; stage "controlnet"): a trainable copy of the base UNet's
  # encoder fed a control image. Control image channels, and the hint encoder's channels: each
  # entry after the first halves the resolution, so 2**(len-1) must be the first stage's factor
  # (diffusers' default (16, 32, 96, 256) for SD's f8). Scale of its residuals in training.
  c.model.controlnet = mc.ConfigDict(dict(
      conditioning_channels=3, conditioning_embedding_out_channels=(16, 32, 96, 256),
      conditioning_scale=1.0))

  # Image-shaped conditions concatenated to the UNet's input (models/image_conditioning.py):
  # "" (none), "inpainting", "upscaling" or "semantic". model.unet.in_channels follows from it
  # (latent + mask + masked-image latents, latent + 3, latent + num_classes); a config may leave
  # it at the latent's channels or give the full width (models/build.py checks it).
  c.model.image_conditioning = mc.ConfigDict()
  c.model.image_conditioning.kind = ""
  # Inpainting masks, drawn in the train step from the step's key (data/inpaint_masks.py): up to
  # max_boxes rectangles and max_strokes thick polylines, or the whole image with
  # full_mask_prob (SD inpainting training masks everything in 25% of the examples).
  c.model.image_conditioning.mask = mc.ConfigDict(dict(
      full_mask_prob=0.25, max_boxes=3, max_strokes=2, stroke_vertices=4,
      stroke_width=(0.05, 0.15), box_size=(0.1, 0.6)))
  # Upscaling: the low-res image is `factor` times smaller (it must be the first stage's factor:
  # the low-res image has the latent's size), made by `degradation` ("area", "bilinear",
  # "bicubic"; data/degradation.py), and noised by a random level in noise_level_range (the x4
  # upscaler's noise augmentation; the level is the UNet's class label, so the UNet gets
  # max(range) + 1 class embeddings). 0 = the first stage's factor.
  c.model.image_conditioning.low_res_factor = 0
  c.model.image_conditioning.degradation = "bicubic"
  c.model.image_conditioning.noise_level_range = (0, 350)
  # Semantic: classes of the segmentation map, and what the shapes data's maps name
  # (data/segmentation.py): "shape" (4 classes with the background), "color" (7) or
  # "color_shape" (19).
  c.model.image_conditioning.num_classes = 0
  c.model.image_conditioning.segmentation = "shape"

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

  # Stage 1 (training/stages/autoencoder.py); defaults are the LDM / SD kl-f8 first-stage recipe.
  c.autoencoder = mc.ConfigDict()
  # "kl" (AutoencoderKL) or "vq" (VQModel); both take their layout from model.vae. In stage 1 the
  # network trained; in stage 2 the kind of the frozen first stage (frozen.vae must be one; a
  # mismatch stops the run), which sampling, export and resuming rebuild from the run's config:
  # "kl" diffuses posterior samples, "vq" the pre-quantization latents (encoder + quant_conv; the
  # UNet's in/out channels = the codebook's vector size), which decoding quantizes. A "vq" stage 2
  # also repeats its first stage's model.vae, num_vq_embeddings and vq_embed_dim.
  c.autoencoder.kind = "kl"
  # Weight of KL(q(z|x) || N(0, I)) against the summed L1 reconstruction error (LDM: ~1e-6).
  c.autoencoder.kl_weight = 1e-6
  # Extra squared-error term on top of L1.
  c.autoencoder.l2_weight = 0.0
  # LPIPS weight; > 0 needs lpips_weights (python -m latent_diffusion_jax.interop.lpips).
  c.autoencoder.perceptual_weight = 1.0
  # LPIPS VGG16 weights file written by the converter (nothing is downloaded).
  c.autoencoder.lpips_weights = ""
  # PatchGAN: the adversarial term starts at disc_start (steps), scaled by disc_factor after it and
  # by disc_weight times the adaptive weight; disc_weight <= 0 trains no discriminator.
  c.autoencoder.disc_start = 50001
  c.autoencoder.disc_factor = 1.0
  c.autoencoder.disc_weight = 0.5
  # "hinge" or "vanilla" (non-saturating binary cross-entropy).
  c.autoencoder.disc_loss = "hinge"
  c.autoencoder.disc_channels = 64
  c.autoencoder.disc_num_layers = 3
  # "batch" (batch statistics, the reference) or "group".
  c.autoencoder.disc_norm = "batch"
  # Discriminator learning rate; <= 0 uses optimizer.learning_rate (its other settings are shared).
  c.autoencoder.disc_learning_rate = 0.0
  # Output log-variance: nll = |x - x_rec| / exp(logvar) + logvar. LDM declares it a parameter but
  # never hands it to its optimizer; learn_logvar=False reproduces that.
  c.autoencoder.logvar_init = 0.0
  c.autoencoder.learn_logvar = True
  # VQ: codebook size, vector size (0: model.vae.latent_channels), commitment beta, weight of the
  # quantizer loss relative to the mean reconstruction error (taming's codebook_weight).
  c.autoencoder.num_vq_embeddings = 8192
  c.autoencoder.vq_embed_dim = 0
  c.autoencoder.vq_beta = 0.25
  c.autoencoder.codebook_weight = 1.0
  # EMA codebook updates instead of the codebook loss: decay (<= 0: gradient updates), and the
  # Laplace smoothing of the code counts.
  c.autoencoder.vq_ema_decay = 0.0
  c.autoencoder.vq_epsilon = 1e-5

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
  # FLOP/s of one device, the denominator of the logged MFU (e.g. 989e12 for an H100's dense bf16);
  # 0 measures a matmul's at start-up, once per device kind and compute dtype.
  c.training.peak_flops_per_device = 0.0
  c.training.checkpoint_every = 1000
  c.training.keep_checkpoints = 3
  c.training.async_checkpointing = True
  # Fixed-seed sample grid written to the logs every N steps; 0 disables it.
  c.training.sample_every = 5000
  # Where training starts when the workdir has no checkpoint: "" (scratch), another workdir, or
  # foreign weights to fine-tune (diffusers directory, single file, native export; docs/PYTORCH.md).
  c.training.init_checkpoint = ""
  # Stage "controlnet": the frozen base model the ControlNet is trained on and copied from (a
  # stage-2 workdir, diffusers pipeline, single file or native export); its UNet layout must be
  # model.unet's. And the share of empty prompts (the ControlNet paper: half), so the control
  # image alone must carry the layout.
  c.training.base_checkpoint = ""
  c.training.control_caption_dropout = 0.5
  # What a non-finite loss or gradient does: "halt" (stop, keeping the last good checkpoint) or
  # "skip" (drop the update and count it).
  c.training.nonfinite_policy = "halt"
  # When the latest checkpoint cannot be restored (damaged files), warn, move it aside as
  # `<step>.corrupt-<time>` and resume from the previous committed step instead of stopping.
  c.training.restore_fallback = False
  # Number of timestep buckets for the loss-per-timestep diagnostic.
  c.training.loss_buckets = 10
  # Batches used to estimate the latent scale factor when model.latent_scale_factor <= 0.
  c.training.scale_estimate_batches = 4

  c.frozen = mc.ConfigDict()
  # The first stage: a stage-1 workdir of ours, a diffusers AutoencoderKL or VQModel directory (or a
  # pipeline holding one), or "" for a randomly initialized one (tests only). Its kind must be
  # autoencoder.kind.
  c.frozen.vae = ""
  # The frozen text encoder (kind "clip"): a transformers CLIPTextModel directory, or "" for random.
  c.frozen.text_encoder = ""
  # Tokenizer directory (CLIP layout); "" builds the embedded dataset's word tokenizer.
  c.frozen.tokenizer = ""
  # Accept pickle (.bin/.ckpt) weights; they can run code when loaded.
  c.frozen.allow_pickle = False

  c.data = mc.ConfigDict()
  # "shapes": the embedded captioned-shapes dataset (generated locally, no download).
  # "latent_shards": shards written by `python -m latent_diffusion_jax.cli.encode` (data.latent_shards).
  # "webdataset": raw image+caption tar shards (data.webdataset), encoded in every step; small runs.
  c.data.kind = "shapes"
  # latent_shards: a directory or pattern of *.tfrecord files (local or gs://) with manifest.json.
  c.data.latent_shards = ""
  # webdataset: tar shards as a path, glob or brace pattern ("shards/{00000..00127}.tar").
  c.data.webdataset = ""
  # Stage 1 on webdataset (required there): held-out tar shards for PSNR/SSIM and the latent scale.
  c.data.eval_webdataset = ""
  # Examples in each host's shuffle buffer (latent_shards, webdataset).
  c.data.shuffle_buffer = 10_000
  # latent_shards: files read and shuffled together; a resume re-reads at most this many files.
  c.data.files_per_window = 16
  # Host batches prepared ahead by tf.data.
  c.data.prefetch = 2
  # latent_shards: feed the stored text embeddings ("context") instead of token ids; needs shards
  # encoded with encode.store_text_embeddings, a frozen text encoder and caption_dropout=0.
  c.data.use_text_embeddings = False
  # latent_shards: refuse shards encoded by a VAE other than frozen.vae (fingerprint of params).
  c.data.check_vae_fingerprint = True
  # Embedded dataset sizes; num_test also caps the held-out images read from data.eval_webdataset.
  c.data.num_train = 20000
  c.data.num_test = 512
  # Where TFDS datasets are prepared; "" means <workdir>/tfds.
  c.data.data_dir = ""
  # ControlNet control images (batch field "control", float [B, H, W, C] in [0, 1]): shapes data
  # computes a hint from each shape, "outline" or "segmentation" (data/control.py; "" none);
  # webdataset reads a member of each sample (e.g. "control.png"), resized and cropped like the image.
  c.data.control = ""
  c.data.control_member = ""
  # Shapes captions without the position phrase ("a red circle"): the control map gives it.
  c.data.drop_position_words = False
  # data.kind="shapes": "single" (one shape per image, captions; batches also carry its class in
  # "class_labels") or "layout" (1 to 3 shapes anywhere; "layout_boxes" [M, 4] and
  # "layout_classes" [M], M = model.conditioner.layout.max_boxes, data/shapes_layout.py).
  c.data.shapes_variant = "single"
  # Stage 2: encode the dataset once with the frozen VAE and train on the stored moments, instead
  # of running the encoder in every step.
  c.data.pre_encode = True
  # Aspect-ratio buckets: pixel (height, width) pairs of about equal area, e.g. ((256, 256),
  # (192, 320), (320, 192)); () keeps one square size (encode.resolution / model.image_size). The
  # encode command puts each image in the bucket nearest its aspect ratio and writes latent shards
  # per bucket; latent_shards training draws every global batch from one bucket (docs/BUCKETS.md).
  # Every side must divide by the first stage's factor x the UNet's 2**(levels-1).
  c.data.buckets = ()

  c.encode = mc.ConfigDict()
  # `python -m latent_diffusion_jax.cli.encode`: WebDataset tar shards -> latent shards. Also the
  # preprocessing of data.kind="webdataset".
  # Crop side in pixels; 0 uses model.image_size. Ignored with data.buckets (they give the sizes).
  c.encode.resolution = 0
  # After resizing the shorter side to the resolution: "center" or "random" (seeded by seed + key).
  c.encode.crop = "center"
  # Images per encoder call on each host (rounded up to a multiple of its device count).
  c.encode.batch_size = 256
  # Stored moments: "float16" or "bfloat16" (compute dtype: model.dtype).
  c.encode.storage_dtype = "float16"
  # Also store the frozen CLIP text encoder's output (float16) next to the token ids.
  c.encode.store_text_embeddings = False
  # WebDataset member holding each sample's class label as an integer in text (e.g. "cls" for
  # KEY.cls), stored as "class_labels"; "" stores none. A sample without it is skipped.
  c.encode.class_field = ""
  # WebDataset member holding a precomputed embedding [L, D] written by np.save (e.g. "npy"),
  # stored (float16) as "embeddings"; [L, D] must equal model.conditioner.precomputed
  # (length, width). "" stores none. A sample without it is skipped.
  c.encode.embedding_field = ""
  # Filters; each is off at its default. Images whose shorter side is below this (pixels).
  c.encode.min_image_size = 0
  # Images whose long/short side ratio exceeds this; <= 0 disables.
  c.encode.max_aspect_ratio = 0.0
  # LAION json metadata: max pwatermark and punsafe (>= 1 disables), min CLIP similarity (<= 0
  # disables). With a filter enabled, a sample lacking its field is skipped (missing_metadata).
  c.encode.max_watermark = 1.0
  c.encode.max_unsafe = 1.0
  c.encode.min_similarity = 0.0
  # Captions longer than text_encoder.max_length tokens: "truncate" (keep, as SD does) or "skip".
  c.encode.long_captions = "truncate"
  # Tar shards read at once per host, and image decoding threads (0: tf.data autotune).
  c.encode.parallel_shards = 8
  c.encode.parallel_decode = 0
  # Seconds between progress lines.
  c.encode.log_every_seconds = 30.0

  c.distributed = mc.ConfigDict()
  # Multi-process runs (several hosts, or several processes on one): all three empty means JAX's
  # cluster auto-detection (TPU pods, SLURM, Open MPI, Kubernetes; else one process). Otherwise
  # every process gets the same "host:port" of process 0 and num_processes, and its own process_id.
  c.distributed.coordinator_address = ""
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  # Cross-process collectives of the CPU backend ("gloo" or "mpi"); GPUs and TPUs ignore it.
  c.distributed.cpu_collectives = "gloo"

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

  # In-training generative metrics (training/eval_hook.py), written to TensorBoard as eval/<metric>.
  c.evaluation = mc.ConfigDict()
  # Evaluate every N steps (on the EMA params); 0 disables it.
  c.evaluation.every = 0
  # The fixed caption set: a text file or COCO captions JSON; "" uses `captions`, then
  # sampling.prompts, cycled to num_images.
  c.evaluation.captions_file = ""
  c.evaluation.captions = ()
  c.evaluation.num_images = 1000
  # Any of "fid", "is", "precision_recall", "clip" (clip needs evaluation.clip).
  c.evaluation.metrics = ("fid",)
  # Feature network: "inception" (pytorch-fid's, converted weights) or "shapes" (embedded data).
  c.evaluation.features = "inception"
  c.evaluation.inception_weights = ""
  # "" means weights/shapes_features.msgpack (python -m latent_diffusion_jax.cli.train_shapes_features).
  c.evaluation.shapes_weights = ""
  # The CLIP model of the CLIP score: a transformers CLIPModel directory or an open_clip
  # checkpoint (evaluation/feature_nets/clip.py load_clip).
  c.evaluation.clip = ""
  # Its open_clip architecture (e.g. "ViT-H-14") when no open_clip_config.json lies beside it.
  c.evaluation.clip_model_name = ""
  # Reference .npz (mu, sigma); "" computes it once from the held-out images (data.num_test).
  c.evaluation.reference_stats = ""
  c.evaluation.sampler = "ddim"
  c.evaluation.num_steps = 50
  c.evaluation.guidance_scale = 7.5
  c.evaluation.eta = 0.0
  c.evaluation.seed = 0
  # Images per sampling call (0: 4 per device) and per feature network call.
  c.evaluation.batch_size = 0
  c.evaluation.feature_batch_size = 50
  return c


def ldm_first_stage_training(c: mc.ConfigDict) -> None:
  """The LDM paper's first-stage optimization (its autoencoder configs): Adam(0.5, 0.9) at the base
  rate 4.5e-6 times the global batch of 96, constant, no weight decay, clipping or EMA, 300k steps."""
  c.training.batch_size = 96
  c.training.num_steps = 300_000
  c.training.log_every = 100
  c.training.checkpoint_every = 5000
  c.training.sample_every = 5000
  o = c.optimizer
  o.learning_rate = 4.5e-6 * c.training.batch_size
  o.warmup_steps = 0
  o.schedule = "constant"
  o.b1, o.b2 = 0.5, 0.9
  o.weight_decay = 0.0
  o.grad_clip_norm = 0.0
  o.ema_decay = 0.0


def first_stage_smoke_run(c: mc.ConfigDict) -> None:
  """Turns a first-stage config into a 2-step run on 64 embedded images (tests): batch 8, a
  checkpoint every step, the adversarial loss from step 1, no LPIPS."""
  a = c.autoencoder
  a.perceptual_weight = 0.0
  a.disc_start = 1
  c.training.batch_size = 8
  c.training.num_steps = 2
  c.training.log_every = 1
  c.training.checkpoint_every = 1
  c.training.sample_every = 0
  c.data.num_train = 64
  c.data.num_test = 16


def tiny_models(c: mc.ConfigDict, unet_channels=(32, 64)) -> mc.ConfigDict:
  """Shrinks all three networks of `c` in place (the UNet, the autoencoder and the text encoder,
  CLIP or the LDM transformer) to a few hundred thousand params, same structure, and makes training
  a 2-step smoke run on the embedded dataset."""
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
  ldm = c.model.text_encoder.ldm  # the LDM paper's transformer, when text_encoder.kind selects it
  ldm.vocab_size, ldm.width, ldm.depth, ldm.heads, ldm.head_dim = 1000, clip.hidden_size, 2, 4, 8
  u.cross_attention_dim = clip.hidden_size
  # A 2-step smoke run on 64 images of the embedded dataset (its word tokenizer fits CLIP's layout).
  c.training.batch_size = 8
  c.training.num_steps = 2
  c.training.log_every = 1
  c.training.checkpoint_every = 1
  c.training.sample_every = 0
  c.optimizer.warmup_steps = 1
  c.data.num_train = 64
  c.data.num_test = 16
  return c


# The keys that describe a first stage (besides its kind): a stage-2 config repeats them so that
# every reader of the run rebuilds its frozen autoencoder (models/build.build_first_stage).
FIRST_STAGE_KEYS = ("autoencoder.kind", "autoencoder.num_vq_embeddings", "autoencoder.vq_embed_dim",
                    "model.vae", "model.image_size")


def copy_first_stage(stage2: mc.ConfigDict, stage1: mc.ConfigDict) -> mc.ConfigDict:
  """Sets `stage2`'s first-stage description (FIRST_STAGE_KEYS) to `stage1`'s, in place, so a
  stage-2 config states its first stage once: by naming the stage-1 config that trains it."""
  for key in FIRST_STAGE_KEYS:
    section, name = key.split(".")
    value = stage1[section][name]
    if isinstance(value, mc.ConfigDict):
      stage2[section][name].update(value.to_dict())
    else:
      stage2[section][name] = value
  return stage2


def image_conditioned_shapes(configs_dir: str, kind: str, tiny: bool) -> mc.ConfigDict:
  """`configs_dir`/shapes_ldm.py with `model.image_conditioning.kind=kind` on the conditioning
  demos' first stage (configs/shapes_autoencoder.py:layouts, as the Makefile trains it), for
  configs/shapes_{inpaint,sr,semantic}_ldm.py; `tiny`: a 2-step run of a smaller UNet on a random
  autoencoder of the demo's layout (tests)."""
  c = load_config_file(os.path.join(configs_dir, "shapes_ldm.py") + (":tiny" if tiny else ""))
  c.model.image_conditioning.kind = kind
  c.frozen.vae = "workdirs/demo/autoencoder_layouts"
  # The grid and evaluation hooks sample text-to-image; these models need image inputs.
  c.training.sample_every = 0
  if tiny:
    c.frozen.vae = ""
    c.model.unet.block_out_channels = (32, 64)
    c.model.unet.attention_levels = (True, False)
    c.data.num_train, c.data.num_test = 32, 8
  return c


def load_config_file(path_and_arg: str) -> mc.ConfigDict:
  """Loads `configs/x.py[:arg]` like `config_flags` does, for tools and tests that take no flags."""
  path, _, arg = path_and_arg.partition(":")
  if not os.path.isfile(path):
    raise MissingInputError(f"No config file at {path!r}.")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def config_to_json(config: mc.ConfigDict) -> str:
  return config.to_json_best_effort(sort_keys=True)


def _tuplify(x):
  if isinstance(x, list):
    return tuple(_tuplify(v) for v in x)
  if isinstance(x, dict):
    return {k: _tuplify(v) for k, v in x.items()}
  return x


def config_from_json(text: str) -> mc.ConfigDict:
  """Rebuilds a run's config over the base config (so every key keeps its declared type)."""
  config = base_config()
  stored = _tuplify(json.loads(text))

  def merge(dst: mc.ConfigDict, src: dict):
    for k, v in src.items():
      if isinstance(v, dict) and k in dst and isinstance(dst[k], mc.ConfigDict):
        merge(dst[k], v)
      else:
        with dst.ignore_type():
          dst[k] = v

  merge(config, stored)
  return config
