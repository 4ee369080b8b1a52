"""Stage 1: the KL or VQ autoencoder (+ PatchGAN, LPIPS), then its held-out summary and latent scale.

  python train.py --config configs/shapes_autoencoder.py --workdir workdirs/shapes_ae

Held-out images come from the configured data (data/batches.py `held_out_images`): the shapes
test split, or the tar shards of `data.eval_webdataset` for a WebDataset run (required there).
After the last step the run reconstructs them and prints their PSNR and SSIM, writes a
reconstruction grid (originals above, reconstructions below) to the logs, and estimates the latent
scale factor on them (1/std of posterior means, or of pre-quantization latents for VQ: the LDM
paper's rule); summary and scale go into `<workdir>/stage1.json`, which stage 2 reads. With
`training.sample_every > 0` the same metrics and grid (of the first 64 images) are logged during
training. The evaluation runs on the mesh with the sharded params (training/reconstruction.py).
"""

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mc
from absl import logging

from latent_diffusion_jax.artifacts.workdir import AUTOENCODER_KIND, STAGE1_SUMMARY
from latent_diffusion_jax.core.errors import MissingInputError
from latent_diffusion_jax.data.batches import check_held_out, held_out_images, make_batches
from latent_diffusion_jax.models import build
from latent_diffusion_jax.training import startup
from latent_diffusion_jax.training.autoencoder_step import (AutoencoderTask, AutoencoderTrainState,
                                                            CODEBOOK_PATH, make_optimizer,
                                                            make_train_step)
from latent_diffusion_jax.training.reconstruction import (EVAL_BATCH, ReconstructionEval,
                                                          ReconstructionHook, eval_params)
from latent_diffusion_jax.training.stages.base import Plan, Stage
from latent_diffusion_jax.training.state import learning_rate_schedule
from latent_diffusion_jax.training.state import make_optimizer as make_base_optimizer


def build_task(config: mc.ConfigDict, vae: nn.Module) -> AutoencoderTask:
  """The step's static parts: losses and weights from `config.autoencoder`, discriminator, LPIPS."""
  from latent_diffusion_jax.models.discriminator import PatchDiscriminator
  from latent_diffusion_jax.models.lpips import LPIPS
  a, m = config.autoencoder, config.model
  kw = dict(dtype=build.dtype_of(m.dtype), param_dtype=build.dtype_of(m.param_dtype))
  disc = None
  if a.disc_weight > 0 and a.disc_factor > 0:
    disc = PatchDiscriminator(channels=a.disc_channels, num_layers=a.disc_num_layers,
                              norm=a.disc_norm, **kw)
  return AutoencoderTask(
      vae=vae, discriminator=disc, lpips=LPIPS() if a.perceptual_weight > 0 else None,
      kl_weight=a.kl_weight, l2_weight=a.l2_weight, perceptual_weight=a.perceptual_weight,
      disc_start=a.disc_start, disc_factor=a.disc_factor, disc_weight=a.disc_weight,
      disc_loss=a.disc_loss, learn_logvar=a.learn_logvar, codebook_weight=a.codebook_weight,
      vq_beta=a.vq_beta, vq_ema_decay=a.vq_ema_decay, vq_epsilon=a.vq_epsilon)


def build_optimizer(config: mc.ConfigDict, task: AutoencoderTask):
  """(combined optax transform, generator learning-rate schedule)."""
  steps = config.training.num_steps
  disc_cfg = mc.ConfigDict(config.optimizer.to_dict())
  if config.autoencoder.disc_learning_rate > 0:
    disc_cfg.learning_rate = config.autoencoder.disc_learning_rate
  tx = make_optimizer(task, make_base_optimizer(config.optimizer, steps),
                      make_base_optimizer(disc_cfg, steps), make_base_optimizer(config.optimizer, steps))
  return tx, learning_rate_schedule(config.optimizer, steps)


def build_init_fn(config: mc.ConfigDict, vae: nn.Module):
  """`init_fn(rng) -> AutoencoderTrainState` with boxed params (sharded creation, restore targets)."""
  from latent_diffusion_jax.models.vq import init_codebook_ema
  task = build_task(config, vae)
  tx, _ = build_optimizer(config, task)
  size = config.model.image_size

  def init_fn(rng):
    r_vae, r_disc = jax.random.split(rng)
    x = jnp.zeros((1, size, size, vae.in_channels))
    params = {"vae": vae.init(r_vae, x)["params"],
              "logvar": jnp.full((), config.autoencoder.logvar_init, jnp.float32)}
    if task.adversarial:
      params["discriminator"] = task.discriminator.init(r_disc, x)["params"]
    model_state = {}
    if task.ema_codebook:
      node = params["vae"]
      for name in CODEBOOK_PATH:
        node = node[name]
      ema = init_codebook_ema(nn.meta.unbox(node))
      model_state["codebook_ema"] = {
          "cluster_size": nn.Partitioned(ema["cluster_size"], names=("vocab",)),
          "embed_sum": nn.Partitioned(ema["embed_sum"], names=("vocab", "embed"))}
    return AutoencoderTrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if config.optimizer.ema_decay > 0 else None,
        rng=jax.random.key_data(jax.random.key(config.seed)),
        nonfinite_skips=jnp.zeros((), jnp.int32), model_state=model_state)

  return init_fn


def load_lpips_params(config: mc.ConfigDict) -> Any:
  """LPIPS weights when the perceptual loss is on (None otherwise); stops with how to get them."""
  if config.autoencoder.perceptual_weight <= 0:
    return None
  from latent_diffusion_jax.models import lpips
  path = config.autoencoder.lpips_weights
  if not path or not os.path.isfile(path):
    raise MissingInputError(lpips.missing_weights_message(path))
  return lpips.load_params(path)


class AutoencoderStage(Stage):
  """Stage 1 for the driver: LPIPS weights as the step argument, held-out evaluation as hook and
  finish, stage1.json at the end."""
  kind = AUTOENCODER_KIND

  def __init__(self, config, workdir, mesh, global_batch):
    super().__init__(config, workdir, mesh, global_batch)
    check_held_out(config)  # before training, not after it
    self.lpips_params = load_lpips_params(config)
    self.vae = build.build_first_stage(config)
    self.task = build_task(config, self.vae)
    self.tx, self.lr = build_optimizer(config, self.task)
    self.init_fn = build_init_fn(config, self.vae)
    self.trained = {"vae": self.vae}
    self.evaluate = ReconstructionEval(self.vae, mesh)
    self.held_out = None

  def data(self):
    batches = make_batches(self.config, self.workdir, self.global_batch, self.mesh)
    self.held_out = held_out_images(self.config, self.workdir)
    return batches

  def start(self, meta, writer) -> Plan:
    del meta
    config = self.config
    args = () if self.lpips_params is None else (startup.put_replicated(self.lpips_params, self.mesh),)
    hooks = []
    if config.training.sample_every > 0:
      hooks.append(ReconstructionHook(config.training.sample_every, writer, self.evaluate,
                                      self.held_out[:EVAL_BATCH]))
    step = make_train_step(self.task, self.tx, self.lr, ema_decay=config.optimizer.ema_decay,
                           grad_accum_steps=max(config.optimizer.grad_accum_steps, 1))
    return Plan(step=step, args=args, hooks=hooks)

  def finish(self, result, writer) -> None:
    """Held-out summary of the final params on every process; process 0 writes stage1.json."""
    if result["preempted"]:
      return
    summary, grid = self.evaluate(eval_params(result["state"]), self.held_out)
    summary.update(step=result["step"], kind=self.config.autoencoder.kind)
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, STAGE1_SUMMARY), "w") as f:
        json.dump(summary, f, indent=2)
      message = (f"Stage 1 held-out PSNR {summary['psnr']:.2f} dB, SSIM {summary['ssim']:.4f}, "
                 f"latent scale factor {summary['latent_scale_factor']:.5f} "
                 f"({len(self.held_out)} images)")
      logging.info(message)
      print(message, flush=True)
    writer.write_scalars(result["step"], {"eval/psnr": summary["psnr"], "eval/ssim": summary["ssim"]})
    writer.write_images(result["step"], {"reconstructions": grid[None]})
    writer.flush()
    result["eval"] = summary
