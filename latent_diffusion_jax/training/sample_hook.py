"""Writes a fixed-seed sample grid of the config's prompts to the logs every N steps."""

import os

import jax
import numpy as np
from absl import logging

from latent_diffusion_jax.diffusion.spec import DiffusionSpec
from latent_diffusion_jax.models.bundle import ModelBundle


class SampleGridHook:
  """hook(step, state): every `training.sample_every` steps, samples `sampling.prompts` with the
  EMA params (raw params when EMA is off), logs the grid as an image and saves it as a PNG."""

  def __init__(self, config, workdir, writer, scale, vae, vae_params, text_encoder, text_params,
               unet, mesh):
    self.config, self.workdir, self.writer, self.mesh = config, workdir, writer, mesh
    te = config.model.text_encoder
    self.bundle = ModelBundle(
        unet=unet, unet_params=None, vae=vae, vae_params=vae_params, text_encoder=text_encoder,
        text_encoder_params=text_params, tokenizer_path=os.path.join(workdir, "tokenizer"),
        scaling_factor=scale, diffusion=DiffusionSpec.from_config(config.diffusion),
        image_size=config.model.image_size, max_length=te.max_length)

  def __call__(self, step: int, state) -> None:
    every = self.config.training.sample_every
    if every <= 0 or step % every:
      return
    from latent_diffusion_jax.core.images import make_grid, save_images
    from latent_diffusion_jax.sampling.generation import generate
    params = state.ema_params if state.ema_params is not None else state.params
    params = jax.device_get(params)
    self.bundle.unet_params = params["unet"]
    if self.config.model.text_encoder.trainable:
      self.bundle.text_encoder_params = params["text_encoder"]
    s = self.config.sampling
    prompts = list(s.prompts)
    images = generate(self.bundle, prompts, seed=self.config.seed, num_steps=s.num_steps,
                      guidance_scale=s.guidance_scale, sampler=s.sampler, eta=s.eta, mesh=self.mesh)
    out = os.path.join(self.workdir, "samples", f"step_{step:07d}")
    if jax.process_index() == 0:
      save_images(images, out, prompts, {"step": step, "seed": self.config.seed,
                                         "sampler": s.sampler, "steps": s.num_steps,
                                         "guidance_scale": s.guidance_scale})
    self.writer.write_images(step, {"samples": make_grid(np.asarray(images))[None]})
    logging.info("Step %d: sample grid written to %s", step, out)
