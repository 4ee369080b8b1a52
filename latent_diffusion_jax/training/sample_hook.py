"""Writes a fixed-seed sample grid of the config's prompts to the logs every N steps.

Sampling runs as the jitted sampler over the training mesh on the train state's params as they are
sharded (FSDP may split them over processes) and the frozen params already placed there; only the
images come to the host. Process 0 writes the PNGs.
"""

import os
from typing import Any, Dict

import jax
import numpy as np
from absl import logging

from latent_diffusion_jax.core.images import make_grid, save_images
from latent_diffusion_jax.diffusion.spec import DiffusionSpec
from latent_diffusion_jax.models.bundle import ModelBundle
from latent_diffusion_jax.sampling.generation import SampleParams, generate


class SampleGridHook:
  """hook(step, state): every `training.sample_every` steps, samples `sampling.prompts` with the
  EMA params (raw params when EMA is off), logs the grid as an image and saves it as a PNG.

  Args:
    frozen: the frozen params on the mesh: "vae", and "text_encoder" when the text encoder is
      frozen (a trained one comes from the state).
  """

  def __init__(self, config, workdir, writer, scale, vae, text_encoder, unet,
               frozen: Dict[str, Any], mesh):
    self.config, self.workdir, self.writer, self.mesh = config, workdir, writer, mesh
    self.frozen = frozen
    te = config.model.text_encoder
    # Modules and settings only: the params are passed placed to `generate`.
    self.bundle = ModelBundle(
        unet=unet, unet_params=None, vae=vae, vae_params=None, text_encoder=text_encoder,
        text_encoder_params=None, tokenizer_path=os.path.join(workdir, "tokenizer"),
        scaling_factor=scale, diffusion=DiffusionSpec.from_config(config.diffusion),
        image_size=config.model.image_size, max_length=te.max_length)

  def __call__(self, step: int, state) -> None:
    every = self.config.training.sample_every
    if every <= 0 or step % every:
      return
    trained = state.ema_params if state.ema_params is not None else state.params
    text = (trained["text_encoder"] if self.config.model.text_encoder.trainable
            else self.frozen.get("text_encoder"))
    params = SampleParams(unet=trained["unet"], vae=self.frozen["vae"], text_encoder=text)
    s = self.config.sampling
    prompts = list(s.prompts)
    images = generate(self.bundle, prompts, seed=self.config.seed, num_steps=s.num_steps,
                      guidance_scale=s.guidance_scale, sampler=s.sampler, eta=s.eta, mesh=self.mesh,
                      params=params)
    out = os.path.join(self.workdir, "samples", f"step_{step:07d}")
    if jax.process_index() == 0:
      save_images(images, out, prompts, {"step": step, "seed": self.config.seed,
                                         "sampler": s.sampler, "steps": s.num_steps,
                                         "guidance_scale": s.guidance_scale})
      logging.info("Step %d: sample grid written to %s", step, out)
    self.writer.write_images(step, {"samples": make_grid(np.asarray(images))[None]})
