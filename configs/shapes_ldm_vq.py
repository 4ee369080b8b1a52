"""Stage 2 of the embedded default on a VQ-f4 first stage: the shapes text-to-image LDM of
configs/shapes_ldm.py, diffusing the pre-quantization latents of configs/shapes_vq_autoencoder.py
(the LDM paper's VQ-regularized setting). `make demo-vq` runs:
  python train.py --config configs/shapes_vq_autoencoder.py --workdir workdirs/demo_vq/autoencoder
  python train.py --config configs/shapes_ldm_vq.py --workdir workdirs/demo_vq/ldm \
      --config.frozen.vae=workdirs/demo_vq/autoencoder
The first stage (autoencoder.kind="vq", its codebook and model.vae) is copied from the stage-1
config, so the loader, sampler and exporters rebuild the same VQModel from this run's config; a
frozen.vae of another kind or shape stops the run with the key to fix. The latent scale factor is
stage 1's (1/std of the pre-quantization latents, in its stage1.json); samples decode through the
quantizer. Measured with `make demo-vq` (BENCHMARKS.md): 93.8% color+position on the held-out
captions (the evaluator reads 98.2% on stage 1's reconstructions, the ceiling). Arguments: `tiny` (a 2-step smoke run on 64 images, for tests), `clip` (a frozen tiny
CLIP text encoder, random unless frozen.text_encoder names one, instead of the LDM transformer:
such a run exports to a diffusers LDMTextToImagePipeline; for tests).
"""

import os

from latent_diffusion_jax.core.config import copy_first_stage, load_config_file, parse_arg

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  args = parse_arg(arg, tiny=False, clip=False)
  suffix = ":tiny" if args.tiny else ""
  c = load_config_file(os.path.join(_HERE, "shapes_ldm.py") + suffix)
  copy_first_stage(c, load_config_file(os.path.join(_HERE, "shapes_vq_autoencoder.py") + suffix))
  channels = c.autoencoder.vq_embed_dim or c.model.vae.latent_channels
  # The UNet denoises the codebook-sized pre-quantization latents (8x8x3 for 32 px images).
  c.model.unet.in_channels = channels
  c.model.unet.out_channels = channels
  c.model.latent_scale_factor = 0.0  # stage 1's stored estimate (or estimated here)
  if args.clip:
    te = c.model.text_encoder
    te.kind, te.trainable = "clip", False
    te.clip.update(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4)
    c.model.unet.cross_attention_dim = te.clip.hidden_size
  return c
