"""Generative metrics inside training: every `evaluation.every` steps, FID (and IS, precision/recall,
CLIP score as configured) of images sampled for a fixed caption set, written to TensorBoard.

Like the sample grid hook, it samples with the jitted sampler over the training mesh on the EMA
params as they are sharded (FSDP may split them over processes; nothing is gathered to one host)
and extracts features sharded over the same mesh; only images and features reach the host. Every
process computes the same metrics; process 0 writes `<workdir>/eval/step_<N>/metrics.json` (and
the writer, TensorBoard on process 0, the scalars `eval/<metric>`).

The reference statistics are `evaluation.reference_stats` when given, else computed once from the
run's held-out images (`data.num_test` of the shapes test split or of data.eval_webdataset) and
saved as `<workdir>/eval/reference_<net>.npz` (pytorch-fid's layout).
"""

import os
from typing import Any, Dict, List

import jax
import numpy as np
from absl import logging

from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.diffusion.spec import DiffusionSpec
from latent_diffusion_jax.evaluation import scoring
from latent_diffusion_jax.evaluation.captions import read_captions, select
from latent_diffusion_jax.evaluation.features import load_feature_net
from latent_diffusion_jax.evaluation.metrics.fid import feature_stats, load_stats, save_stats
from latent_diffusion_jax.evaluation.reference import Reference, check_width
from latent_diffusion_jax.evaluation.report import flatten, write_report
from latent_diffusion_jax.models.bundle import ModelBundle
from latent_diffusion_jax.sampling.generation import SampleParams, generate


def eval_captions(config) -> List[str]:
  """`evaluation.num_images` captions: from evaluation.captions_file, else evaluation.captions,
  else sampling.prompts, cycled."""
  e = config.evaluation
  if e.captions_file:
    return read_captions(e.captions_file, e.num_images)
  captions = list(e.captions) or list(config.sampling.prompts)
  return select(captions, e.num_images, shuffle=False)


class EvalHook:
  """hook(step, state) of the diffusion stage; see the module docstring.

  Args:
    frozen: the frozen params on the mesh ("vae", and "text_encoder" when frozen).
  """

  def __init__(self, config, workdir, writer, scale, vae, text_encoder, unet,
               frozen: Dict[str, Any], mesh):
    self.config, self.workdir, self.writer, self.mesh, self.frozen = config, workdir, writer, mesh, frozen
    e = config.evaluation
    self.metrics = scoring.parse_metrics(tuple(e.metrics))
    self.captions = eval_captions(config) if text_encoder is not None else [""] * e.num_images
    scoring.check_count(self.metrics, e.num_images)
    scoring.check_clip(self.metrics, e.clip, self.captions if text_encoder is not None else None)
    self.net = None
    if {"fid", "is", "precision_recall"} & set(self.metrics):
      # Loaded now, so missing weights stop the run before training, not at the first evaluation.
      self.net = load_feature_net(e.features, inception_weights=e.inception_weights,
                                  shapes_weights=e.shapes_weights)
    if "precision_recall" in self.metrics and e.reference_stats:
      raise UserInputError("evaluation.metrics has precision_recall, which needs reference "
                           "features: leave evaluation.reference_stats empty (held-out images)")
    if self.net is not None and "fid" in self.metrics and e.num_images < self.net.dim:
      logging.warning("evaluation.num_images=%d is below the %d feature width: the covariance is "
                      "singular and FID biased high (compare runs only at equal counts).",
                      e.num_images, self.net.dim)
    self.reference = None
    self.bundle = ModelBundle(
        unet=unet, unet_params=None, vae=vae, vae_params=None, text_encoder=text_encoder,
        text_encoder_params=None, tokenizer_path=os.path.join(workdir, "tokenizer"),
        scaling_factor=scale, diffusion=DiffusionSpec.from_config(config.diffusion),
        image_size=config.model.image_size, max_length=config.model.text_encoder.max_length)

  def _reference(self) -> Reference:
    if self.reference is not None:
      return self.reference
    e = self.config.evaluation
    if e.reference_stats:
      stats = load_stats(e.reference_stats)
      check_width(stats, self.net, e.reference_stats)
      self.reference = Reference(stats, None, e.reference_stats)
    else:
      from latent_diffusion_jax.data.batches import held_out_images
      images = held_out_images(self.config, self.workdir)
      features = self.net.extract(images, batch_size=e.feature_batch_size, mesh=self.mesh)["features"]
      stats = feature_stats(features)
      path = os.path.join(self.workdir, "eval", f"reference_{self.net.name}.npz")
      if jax.process_index() == 0:
        save_stats(path, stats)
      logging.info("Evaluation reference: %d held-out images (statistics in %s)", len(images), path)
      self.reference = Reference(stats, features, "held-out images")
    return self.reference

  def __call__(self, step: int, state) -> None:
    e = self.config.evaluation
    if e.every <= 0 or step % e.every:
      return
    trained = state.ema_params if state.ema_params is not None else state.params
    text = (trained["text_encoder"] if self.config.model.text_encoder.trainable
            else self.frozen.get("text_encoder"))
    params = SampleParams(unet=trained["unet"], vae=self.frozen["vae"], text_encoder=text)
    images = generate(self.bundle, self.captions, seed=e.seed, num_steps=e.num_steps,
                      guidance_scale=e.guidance_scale, sampler=e.sampler, eta=e.eta,
                      batch_size=e.batch_size or None, mesh=self.mesh, params=params)
    result: Dict[str, Any] = {}
    if self.net is not None:
      generated = self.net.extract(images, batch_size=e.feature_batch_size, mesh=self.mesh)
      reference = self._reference() if {"fid", "precision_recall"} & set(self.metrics) else None
      try:
        result.update(scoring.image_metrics(self.metrics, generated, reference))
      except ArithmeticError as error:  # a covariance square root gone complex: rare, not fatal
        logging.error("Step %d: evaluation failed (%s); training goes on.", step, error)
        return
    if "clip" in self.metrics:
      result["clip"] = scoring.clip_metric(
          e.clip, [images], self.captions, model_name=e.clip_model_name or None,
          allow_pickle=self.config.frozen.allow_pickle, mesh=self.mesh)
    scalars = {f"eval/{k}": float(v) for k, v in flatten(result).items()
               if isinstance(v, (float, int, np.floating)) and not k.endswith("splits")}
    self.writer.write_scalars(step, scalars)
    logging.info("Step %d: evaluation %s", step,
                 ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
    if jax.process_index() == 0:
      write_report(os.path.join(self.workdir, "eval", f"step_{step:07d}"), result,
                   {"step": step, "num_images": len(images), "features": self.net.name if self.net else None,
                    "sampler": e.sampler, "num_steps": e.num_steps,
                    "guidance_scale": e.guidance_scale, "seed": e.seed})
