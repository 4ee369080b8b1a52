"""Jitted generation from a model bundle (`generation`), ControlNets at sampling time (`controlnet`)
and sample.py's command logic (`run`)."""

import latent_diffusion_jax.sampling.controlnet as controlnet
from latent_diffusion_jax.sampling.controlnet import Control
from latent_diffusion_jax.sampling.generation import (OUTPUT_TYPES, SAMPLERS, SampleFn, SampleParams,
                                                      bundle_params, default_mesh,
                                                      effective_batch_size, generate, image_noise,
                                                      latent_shape, make_sample_fn, to_uint8)
from latent_diffusion_jax.sampling.image_conditioned import (generate_from_images, image_to_image,
                                                             inpaint, semantic_to_image, upscale)
from latent_diffusion_jax.sampling.image_inputs import ImageInputs
from latent_diffusion_jax.sampling.run import read_prompts_file, run_sampling

__all__ = ["Control", "OUTPUT_TYPES", "SAMPLERS", "SampleFn", "SampleParams", "bundle_params",
           "controlnet", "default_mesh", "effective_batch_size", "generate", "image_noise",
           "latent_shape", "make_sample_fn", "read_prompts_file", "run_sampling", "to_uint8",
           # image-conditioned sampling
           "ImageInputs", "generate_from_images", "image_to_image", "inpaint", "semantic_to_image",
           "upscale"]
