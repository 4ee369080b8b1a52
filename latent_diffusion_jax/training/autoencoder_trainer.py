"""Stage 1: trains the KL or VQ autoencoder (+ PatchGAN, LPIPS), then stores the latent scale factor.

  python train.py --config configs/shapes_autoencoder.py --workdir workdirs/shapes_ae

After the last step the run reconstructs the held-out images and prints their PSNR and SSIM, writes
a reconstruction grid (originals above, reconstructions below) to the logs, and estimates the
latent scale factor (1/std of posterior means, or of pre-quantization latents for VQ: the LDM
paper's rule); summary and scale go into `<workdir>/stage1.json`, which stage 2 reads.
With `training.sample_every > 0` the same metrics and grid are logged during training.
"""

import json
import os
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
from absl import logging

from latent_diffusion_jax.core import parallel, pixels
from latent_diffusion_jax.models import build
from latent_diffusion_jax.core import config as config_lib
from latent_diffusion_jax.training import loop, startup
from latent_diffusion_jax.training.autoencoder_step import (AutoencoderTask, AutoencoderTrainState,
                                                            CODEBOOK_PATH, make_optimizer,
                                                            make_train_step, reconstruct,
                                                            scale_latents)
from latent_diffusion_jax.checkpoints.checkpointer import Checkpointer
from latent_diffusion_jax.evaluation.image_metrics import psnr, ssim
from latent_diffusion_jax.training.state import learning_rate_schedule
from latent_diffusion_jax.training.state import make_optimizer as make_base_optimizer

from latent_diffusion_jax.artifacts.workdir import AUTOENCODER_KIND as META_KIND, STAGE1_SUMMARY
from latent_diffusion_jax.core.errors import MissingInputError
GRID_IMAGES = 8


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


def make_eval_fn(vae: nn.Module):
  """Jitted (params, images) -> (psnr [B], ssim [B], scale latents, reconstructions in [-1, 1])."""
  def fn(params, images):
    x = pixels.to_float(images)
    recon = reconstruct(vae, params, images)
    return psnr(recon, x), ssim(recon, x), scale_latents(vae, params, images), recon
  return jax.jit(fn)


def evaluate(vae: nn.Module, params: Any, images: np.ndarray, batch_size: int = 64,
             eval_fn=None) -> Tuple[Dict[str, float], np.ndarray]:
  """Held-out PSNR / SSIM of deterministic reconstructions and 1/std of the stage-2 latents.

  Returns:
    ({"psnr", "ssim", "latent_scale_factor"}, uint8 grid of the first images over their
    reconstructions).
  """
  eval_fn = eval_fn or make_eval_fn(vae)
  psnrs, ssims, latents, grid = [], [], [], None
  for i in range(0, len(images), batch_size):
    chunk = images[i:i + batch_size]
    p, s, z, recon = jax.device_get(eval_fn(params, chunk))
    psnrs.append(p)
    ssims.append(s)
    latents.append(np.asarray(z, np.float64).reshape(-1))
    if grid is None:
      grid = _grid(chunk[:GRID_IMAGES], recon[:GRID_IMAGES])
  latents = np.concatenate(latents)
  summary = {"psnr": float(np.mean(np.concatenate(psnrs))), "ssim": float(np.mean(np.concatenate(ssims))),
             "latent_scale_factor": float(1.0 / latents.std())}
  return summary, grid


def _grid(originals: np.ndarray, recon: np.ndarray) -> np.ndarray:
  from latent_diffusion_jax.core.images import make_grid
  orig = originals if originals.dtype == np.uint8 else pixels.to_uint8(originals)
  return make_grid(np.concatenate([orig, pixels.to_uint8(recon)]), ncols=len(orig))


class ReconstructionHook:
  """hook(step, state): every `training.sample_every` steps logs held-out PSNR / SSIM and a grid."""

  def __init__(self, config, writer, vae, images: np.ndarray):
    self.every, self.writer, self.vae, self.images = config.training.sample_every, writer, vae, images
    self.eval_fn = make_eval_fn(vae)

  def __call__(self, step: int, state) -> None:
    if self.every <= 0 or step % self.every:
      return
    params = (state.ema_params if state.ema_params is not None else state.params)["vae"]
    summary, grid = evaluate(self.vae, params, self.images, len(self.images), self.eval_fn)
    self.writer.write_scalars(step, {"eval/psnr": summary["psnr"], "eval/ssim": summary["ssim"]})
    self.writer.write_images(step, {"reconstructions": grid[None]})


def train(config: mc.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains stage 1 in `workdir` (resuming if it holds a checkpoint). Returns the loop summary."""
  from latent_diffusion_jax.training.diffusion_trainer import make_batches, _load_shapes, _version
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.create_mesh(config.mesh.shape)
  rules = tuple(tuple(r) for r in config.mesh.logical_axis_rules)
  global_batch = startup.check_batch(config, mesh)
  lpips_params = load_lpips_params(config)
  vae = build.build_first_stage(config)
  task = build_task(config, vae)
  tx, lr = build_optimizer(config, task)
  checkpointer = Checkpointer(workdir, save_interval_steps=config.training.checkpoint_every,
                              max_to_keep=config.training.keep_checkpoints,
                              async_save=config.training.async_checkpointing)
  checkpointer.install_sigterm_handler()
  data_iter, batches = make_batches(config, workdir, None, global_batch, mesh)
  held_out = _load_shapes(config, workdir, None, "test")["images"]
  writer = loop.create_writer(workdir)
  with parallel.mesh_context(mesh, rules):
    state, shardings, data_state, _ = startup.initial_state(
        config, workdir, build_init_fn(config, vae), mesh, rules, checkpointer, {"vae": vae})
    if data_state is not None:
      data_iter.set_state(data_state)
    first = next(batches)
    step_args = () if lpips_params is None else (startup.put_replicated(lpips_params, mesh),)
    step_fn = startup.compile_step(
        make_train_step(task, tx, lr, ema_decay=config.optimizer.ema_decay,
                        grad_accum_steps=max(config.optimizer.grad_accum_steps, 1)),
        state, shardings, first, step_args, mesh)

    def all_batches():
      yield first
      yield from batches

    meta_value = {"kind": META_KIND, "config": config_lib.config_to_json(config), "version": _version()}
    hooks = [ReconstructionHook(config, writer, vae, held_out[:64])] \
        if config.training.sample_every > 0 else []
    result = loop.run(
        cfg=loop.LoopConfig.from_config(config, global_batch),
        state=state, step_fn=step_fn, step_args=step_args, batches=all_batches(),
        checkpointer=checkpointer, data_state=data_iter.get_state, meta=lambda: meta_value,
        writer=writer, hooks=hooks)
  checkpointer.close()
  if not result["preempted"] and jax.process_index() == 0:
    final = result["state"]
    params = jax.device_get(final.ema_params if final.ema_params is not None else final.params)["vae"]
    summary, grid = evaluate(vae, params, held_out)
    summary.update(step=result["step"], kind=config.autoencoder.kind)
    with open(os.path.join(workdir, STAGE1_SUMMARY), "w") as f:
      json.dump(summary, f, indent=2)
    message = (f"Stage 1 held-out PSNR {summary['psnr']:.2f} dB, SSIM {summary['ssim']:.4f}, latent "
               f"scale factor {summary['latent_scale_factor']:.5f} ({len(held_out)} images)")
    logging.info(message)
    print(message, flush=True)
    writer.write_scalars(result["step"], {"eval/psnr": summary["psnr"], "eval/ssim": summary["ssim"]})
    writer.write_images(result["step"], {"reconstructions": grid[None]})
    writer.flush()
    result["eval"] = summary
  return result
