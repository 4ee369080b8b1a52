"""Stage 1: trains the KL autoencoder, then estimates and stores the latent scale factor.

  python train.py --config configs/shapes_autoencoder.py --workdir workdirs/shapes_ae

After the last step the run evaluates reconstruction PSNR on held-out images and estimates the
latent scale factor (1/std of posterior means, the LDM paper's rule); both go into
`<workdir>/stage1.json`, which stage 2 reads.
"""

import json
import os
from typing import Any, Dict

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
from absl import logging

from latent_diffusion_jax import parallel
from latent_diffusion_jax.models import build
from latent_diffusion_jax.training import loop, setup
from latent_diffusion_jax.training.autoencoder_step import (AutoencoderTask, make_train_step, psnr,
                                                            reconstruct)
from latent_diffusion_jax.training.checkpointing import Checkpointer
from latent_diffusion_jax.training.diffusion_step import images_to_float, init_train_state
from latent_diffusion_jax.training.state import learning_rate_schedule, make_optimizer

META_KIND = "autoencoder"
STAGE1_SUMMARY = "stage1.json"


def build_init_fn(config: mc.ConfigDict, vae, tx):
  size = config.model.image_size

  def init_fn(rng):
    params = {"vae": vae.init(rng, jnp.zeros((1, size, size, vae.in_channels)))["params"]}
    return init_train_state(params, tx, config.seed, ema=config.optimizer.ema_decay > 0)

  return init_fn


def evaluate(vae, params, images: np.ndarray, batch_size: int = 64) -> Dict[str, float]:
  """PSNR of deterministic reconstructions and 1/std of the posterior means over `images`."""
  rec_fn = jax.jit(lambda p, x: psnr(reconstruct(vae, p, x), images_to_float(x)))
  mean_fn = jax.jit(lambda p, x: jnp.split(vae.apply({"params": p}, images_to_float(x),
                                                     method=vae.encode), 2, axis=-1)[0])
  psnrs, means = [], []
  for i in range(0, len(images), batch_size):
    chunk = images[i:i + batch_size]
    psnrs.append(np.asarray(rec_fn(params, chunk)))
    means.append(np.asarray(mean_fn(params, chunk), np.float64).reshape(-1))
  means = np.concatenate(means)
  return {"psnr": float(np.mean(np.concatenate(psnrs))), "latent_scale_factor": float(1.0 / means.std())}


def train(config: mc.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains stage 1 in `workdir` (resuming if it holds a checkpoint). Returns the loop summary."""
  from latent_diffusion_jax.training.diffusion_trainer import make_batches, _load_shapes, _version
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.create_mesh(config.mesh.shape)
  rules = tuple(tuple(r) for r in config.mesh.logical_axis_rules)
  global_batch = setup.check_batch(config, mesh)
  vae = build.build_vae(config.model)
  tx = make_optimizer(config.optimizer, config.training.num_steps)
  lr = learning_rate_schedule(config.optimizer, config.training.num_steps)
  task = AutoencoderTask(vae=vae, kl_weight=config.autoencoder.kl_weight,
                         l2_weight=config.autoencoder.l2_weight)
  checkpointer = Checkpointer(workdir, save_interval_steps=config.training.checkpoint_every,
                              max_to_keep=config.training.keep_checkpoints,
                              async_save=config.training.async_checkpointing)
  checkpointer.install_sigterm_handler()
  data_iter, batches = make_batches(config, workdir, None, global_batch, mesh)
  with parallel.mesh_context(mesh, rules):
    state, shardings, data_state, _ = setup.initial_state(
        config, workdir, build_init_fn(config, vae, tx), mesh, rules, checkpointer)
    if data_state is not None:
      data_iter.set_state(data_state)
    first = next(batches)
    step_fn = setup.compile_step(
        make_train_step(task, tx, lr, ema_decay=config.optimizer.ema_decay,
                        grad_accum_steps=max(config.optimizer.grad_accum_steps, 1)),
        state, shardings, first, (), mesh)

    def all_batches():
      yield first
      yield from batches

    meta_value = {"kind": META_KIND, "config": setup.config_to_json(config), "version": _version()}
    writer = loop.create_writer(workdir)
    result = loop.run(
        cfg=loop.LoopConfig(num_steps=config.training.num_steps, log_every=config.training.log_every,
                            checkpoint_every=config.training.checkpoint_every,
                            global_batch=global_batch,
                            nonfinite_policy=config.training.nonfinite_policy),
        state=state, step_fn=step_fn, step_args=(), batches=all_batches(),
        checkpointer=checkpointer, data_state=data_iter.get_state, meta=lambda: meta_value,
        writer=writer)
  checkpointer.close()
  if not result["preempted"] and jax.process_index() == 0:
    final = result["state"]
    params = jax.device_get(final.ema_params if final.ema_params is not None else final.params)["vae"]
    held_out = _load_shapes(config, workdir, None, "test")["images"]
    summary = evaluate(vae, params, held_out)
    summary["step"] = result["step"]
    with open(os.path.join(workdir, STAGE1_SUMMARY), "w") as f:
      json.dump(summary, f, indent=2)
    logging.info("Stage 1 held-out PSNR %.2f dB, latent scale factor %.5f", summary["psnr"],
                 summary["latent_scale_factor"])
    writer.write_scalars(result["step"], {"eval/psnr": summary["psnr"]})
    result["eval"] = summary
  return result
