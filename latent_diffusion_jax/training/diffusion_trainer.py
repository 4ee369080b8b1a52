"""Stage 2: trains the UNet (and optionally the LDM text conditioner) on latents of a frozen VAE.

  python train.py --config configs/shapes_ldm.py --workdir /tmp/ldm

`train(config, workdir)` is the whole run: data, frozen parts, latent scale, sharded state
(resumed when the workdir has a checkpoint), the compiled step and the loop.
"""

import os
from typing import Any, Dict

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
from absl import logging

from latent_diffusion_jax.core import parallel
from latent_diffusion_jax.diffusion import schedules
from latent_diffusion_jax.diffusion.spec import DiffusionSpec
from latent_diffusion_jax.models import build
from latent_diffusion_jax.artifacts import loader
from latent_diffusion_jax.training import frozen as frozen_lib
from latent_diffusion_jax.core import config as config_lib
from latent_diffusion_jax.training import loop, startup
from latent_diffusion_jax.checkpoints.checkpointer import Checkpointer
from latent_diffusion_jax.training.diffusion_step import (DiffusionTask, encode_latents,
                                                          init_train_state, make_train_step)
from latent_diffusion_jax.training.state import learning_rate_schedule, make_optimizer
from latent_diffusion_jax.checkpoints.trees import save_frozen

from latent_diffusion_jax.artifacts.workdir import DIFFUSION_KIND as META_KIND
from latent_diffusion_jax.core.errors import UserInputError


def make_schedule(config: mc.ConfigDict) -> schedules.NoiseSchedule:
  return DiffusionSpec.from_config(config.diffusion).noise_schedule()


def build_init_fn(config: mc.ConfigDict, unet, text_encoder, tx):
  """`init_fn(rng) -> TrainState` with boxed params (for sharded creation and restore targets)."""
  te = config.model.text_encoder
  size = build.latent_size(config.model)

  def init_fn(rng):
    r_unet, r_text = jax.random.split(rng)
    lat = jnp.zeros((1, size, size, unet.in_channels))
    ctx = jnp.zeros((1, te.max_length if te.kind != "none" else 1, unet.cross_attention_dim))
    labels = (jnp.zeros((1,), jnp.int32),) if unet.num_class_embeds else ()
    params = {"unet": unet.init(r_unet, lat, jnp.zeros((1,), jnp.int32), ctx, *labels)["params"]}
    if te.trainable:
      params["text_encoder"] = text_encoder.init(r_text, jnp.zeros((1, te.max_length), jnp.int32))["params"]
    return init_train_state(params, tx, config.seed, ema=config.optimizer.ema_decay > 0)

  return init_fn


def _check_widths(config: mc.ConfigDict) -> None:
  width = build.context_width(config.model)
  if config.model.text_encoder.kind != "none" and width != config.model.unet.cross_attention_dim:
    raise UserInputError(f"model.unet.cross_attention_dim={config.model.unet.cross_attention_dim} must equal "
                     f"the text encoder width {width}.")


def _load_shapes(config: mc.ConfigDict, workdir: str, tokenizer, split: str) -> Dict[str, np.ndarray]:
  from latent_diffusion_jax.data import shapes_source
  from latent_diffusion_jax.data.tokenizers import tokenize
  data_dir = config.data.data_dir or os.path.join(workdir, "tfds")
  arrays = shapes_source.load_split(data_dir, split, num_train=config.data.num_train,
                                    num_test=config.data.num_test, image_size=config.model.image_size,
                                    seed=config.seed)
  out = {"images": arrays["images"]}
  if tokenizer is not None:
    out["input_ids"] = tokenize(tokenizer, list(arrays["captions"]), config.model.text_encoder.max_length)
  return out


def make_batches(config: mc.ConfigDict, workdir: str, tokenizer, global_batch: int, mesh,
                 vae=None, vae_params=None, log_indices: bool = False):
  """(resumable iterator over this process's data, generator of global batches).

  By `data.kind`: "shapes" (in memory; with `data.pre_encode` and a VAE, images are encoded once
  and batches carry "moments"), "latent_shards" (pre-encoded "moments" + "input_ids", see
  data/latent_shards.py) or "webdataset" (raw tar shards: "images" + "input_ids").
  `log_indices` lets the training iterator write `$LDJ_DATA_INDEX_LOG` (data/array_iterator.py).
  """
  kind = config.data.kind
  if kind == "shapes":
    from latent_diffusion_jax.data.array_iterator import ArrayIterator, index_log_path
    arrays = _load_shapes(config, workdir, tokenizer, "train")
    if config.data.pre_encode and vae is not None:
      from latent_diffusion_jax.data.pre_encode import encode_images
      arrays["moments"] = encode_images(vae, vae_params, arrays.pop("images"),
                                        cache_dir=os.path.join(workdir, "latents"))
    it = ArrayIterator(arrays, global_batch, seed=config.seed, process_index=jax.process_index(),
                       process_count=jax.process_count(),
                       index_log=index_log_path(jax.process_index()) if log_indices else None)
  elif kind == "latent_shards":
    if vae is None:
      raise UserInputError("data.kind='latent_shards' holds latents; training the autoencoder needs "
                       "images (data.kind='webdataset').")
    from latent_diffusion_jax.data import latent_shards
    it = latent_shards.training_reader(config, global_batch, tokenizer=tokenizer,
                                       vae_params=vae_params)
  elif kind == "webdataset":
    from latent_diffusion_jax.data import webdataset
    it = webdataset.training_reader(config, global_batch, tokenizer=tokenizer)
  else:
    raise UserInputError(f"Unknown data.kind {kind!r}; valid: shapes, latent_shards, webdataset.")

  def gen():
    for local in it:
      yield parallel.global_batch(local, mesh)

  return it, gen()


def estimate_scale(config, vae, vae_params, batches, mesh) -> float:
  """1/std of unscaled latents over `training.scale_estimate_batches` batches."""
  task = DiffusionTask(unet=None, vae=vae, text_encoder=None, text_trainable=False,
                       schedule=None, prediction_type="epsilon")
  # Replicated output: every process reads all latents, so all estimate the same scale.
  fn = jax.jit(lambda p, b, r: encode_latents(task, p, b, r), out_shardings=startup.replicated(mesh))
  lats = [jax.device_get(fn(vae_params, b, jax.random.key(i)))
          for i, b in zip(range(config.training.scale_estimate_batches), batches)]
  return frozen_lib.estimate_scale_factor(lats)


def _frozen_from_pipeline(config: mc.ConfigDict) -> None:
  """Fine-tuning a diffusers pipeline: its vae/ (and CLIP text_encoder/, tokenizer/) fill the
  frozen.* keys the config leaves empty, so they match the imported UNet."""
  keys = ["vae"] + (["text_encoder", "tokenizer"] if config.model.text_encoder.kind == "clip" else [])
  defaults = loader.pipeline_parts(config.training.init_checkpoint, keys)
  for key, path in defaults.items():
    if not config.frozen[key]:
      logging.info("frozen.%s = %s (from training.init_checkpoint)", key, path)
      config.frozen[key] = path


def train(config: mc.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains stage 2 in `workdir` (resuming if it holds a checkpoint). Returns the loop summary."""
  os.makedirs(workdir, exist_ok=True)
  _check_widths(config)
  mesh = parallel.create_mesh(config.mesh.shape)
  rules = tuple(tuple(r) for r in config.mesh.logical_axis_rules)
  global_batch = startup.check_batch(config, mesh)
  logging.info("Mesh %s on %d devices, global batch %d", dict(mesh.shape), jax.device_count(), global_batch)

  te_cfg = config.model.text_encoder
  _frozen_from_pipeline(config)
  tokenizer = None
  if te_cfg.kind != "none":
    from latent_diffusion_jax.data.tokenizers import load_tokenizer, prepare_run_tokenizer
    tokenizer = load_tokenizer(prepare_run_tokenizer(config, workdir))
    if te_cfg.kind == "ldm_transformer" and len(tokenizer) > te_cfg.ldm.vocab_size:
      raise UserInputError(f"model.text_encoder.ldm.vocab_size={te_cfg.ldm.vocab_size} is smaller than the "
                       f"tokenizer's {len(tokenizer)} tokens.")

  vae, vae_params, stored_scale = frozen_lib.load_vae(config)
  text_encoder, text_params = frozen_lib.load_text_encoder(config)
  frozen_lib.log_frozen(vae_params, text_params)
  unet = build.build_unet(config.model)
  tx = make_optimizer(config.optimizer, config.training.num_steps)
  lr = learning_rate_schedule(config.optimizer, config.training.num_steps)
  schedule = make_schedule(config)
  d = config.diffusion
  task = DiffusionTask(unet=unet, vae=vae, text_encoder=text_encoder, text_trainable=te_cfg.trainable,
                       schedule=schedule, prediction_type=d.prediction_type,
                       loss_weighting=d.loss_weighting, min_snr_gamma=d.min_snr_gamma,
                       offset_noise=d.offset_noise, caption_dropout=d.caption_dropout,
                       num_buckets=config.training.loss_buckets)

  checkpointer = Checkpointer(workdir, save_interval_steps=config.training.checkpoint_every,
                              max_to_keep=config.training.keep_checkpoints,
                              async_save=config.training.async_checkpointing)
  checkpointer.install_sigterm_handler()
  data_iter, batches = make_batches(config, workdir, tokenizer, global_batch, mesh, vae, vae_params,
                                    log_indices=True)
  with parallel.mesh_context(mesh, rules):
    init_fn = build_init_fn(config, unet, text_encoder, tx)
    trained = {"unet": unet}
    if te_cfg.trainable and text_encoder is not None:
      trained["text_encoder"] = text_encoder
    state, shardings, data_state, meta = startup.initial_state(config, workdir, init_fn, mesh, rules,
                                                             checkpointer, trained)
    if data_state is not None:
      data_iter.set_state(data_state)

    frozen = {"vae": vae_params}
    if text_params is not None:
      frozen["text_encoder"] = text_params
    if tokenizer is not None and d.caption_dropout > 0:
      from latent_diffusion_jax.training.diffusion_step import empty_prompt_ids
      frozen["uncond_ids"] = empty_prompt_ids(tokenizer, te_cfg.max_length)
    frozen = startup.put_replicated(frozen, mesh)

    if meta is not None:
      scale = float(meta["latent_scale_factor"])
    elif config.model.latent_scale_factor > 0:
      scale = float(config.model.latent_scale_factor)
    elif stored_scale is not None:
      scale = stored_scale
    else:
      # A separate iterator, so estimating the scale does not move the training data position.
      est_iter, est_batches = make_batches(config, workdir, tokenizer, global_batch, mesh, vae,
                                           vae_params)
      scale = estimate_scale(config, vae, frozen["vae"], est_batches, mesh)
      del est_iter
    logging.info("Latent scale factor %.6f", scale)
    if jax.process_index() == 0:
      save_frozen(workdir, vae_params=vae_params, text_params=text_params)

    step_args = (frozen, startup.device_scalar(scale, mesh))
    first = next(batches)
    step_fn = startup.compile_step(
        make_train_step(task, tx, lr, ema_decay=config.optimizer.ema_decay,
                        grad_accum_steps=max(config.optimizer.grad_accum_steps, 1)),
        state, shardings, first, step_args, mesh)

    def all_batches():
      yield first
      yield from batches

    meta_value = {"kind": META_KIND, "config": config_lib.config_to_json(config),
                  "latent_scale_factor": scale, "version": _version()}
    writer = loop.create_writer(workdir)
    writer.write_hparams({"global_batch": global_batch, "latent_scale_factor": scale})
    hooks = []
    if config.training.sample_every > 0 and text_encoder is not None:
      from latent_diffusion_jax.training.sample_hook import SampleGridHook
      hooks.append(SampleGridHook(config, workdir, writer, scale, vae, vae_params, text_encoder,
                                  text_params, unet, mesh))
    result = loop.run(
        cfg=loop.LoopConfig.from_config(config, global_batch),
        state=state, step_fn=step_fn, step_args=step_args, batches=all_batches(),
        checkpointer=checkpointer, data_state=data_iter.get_state, meta=lambda: meta_value,
        writer=writer, hooks=hooks)
  checkpointer.close()
  result["latent_scale_factor"] = scale
  return result


def _version() -> str:
  import latent_diffusion_jax
  return getattr(latent_diffusion_jax, "__version__", "0")
