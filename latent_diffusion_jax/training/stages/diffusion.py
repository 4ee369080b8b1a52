"""Stage 2: the UNet (and optionally the LDM text conditioner) on latents of a frozen VAE.

  python train.py --config configs/shapes_ldm.py --workdir /tmp/ldm

Before the state: the frozen VAE and text encoder (a fine-tuned diffusers pipeline fills the empty
frozen.* keys), the tokenizer and the data. Once the state exists: the latent scale factor (the
resumed checkpoint's, model.latent_scale_factor, the frozen VAE's stored one, or 1/std estimated
on the first batches of the configured data), and optionally a fixed-seed sample grid hook.
"""

import dataclasses
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections as mc
from absl import logging

from latent_diffusion_jax.artifacts import loader
from latent_diffusion_jax.artifacts.workdir import DIFFUSION_KIND
from latent_diffusion_jax.checkpoints.trees import save_frozen
from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.data import buckets as buckets_lib
from latent_diffusion_jax.data.batches import make_batches
from latent_diffusion_jax.diffusion import schedules
from latent_diffusion_jax.diffusion.spec import DiffusionSpec
from latent_diffusion_jax.models import build
from latent_diffusion_jax.training import frozen as frozen_lib
from latent_diffusion_jax.training import startup
from latent_diffusion_jax.training.diffusion_step import (DiffusionTask, empty_prompt_ids,
                                                          encode_latents, init_train_state,
                                                          make_train_step, null_inputs)
from latent_diffusion_jax.training.stages.base import Plan, Stage
from latent_diffusion_jax.training.state import learning_rate_schedule, make_optimizer


TEXT_KINDS = ("clip", "ldm_transformer")


def make_schedule(config: mc.ConfigDict) -> schedules.NoiseSchedule:
  return DiffusionSpec.from_config(config.diffusion).noise_schedule()


def build_init_fn(config: mc.ConfigDict, unet, conditioner, tx):
  """`init_fn(rng) -> TrainState` with boxed params (for sharded creation and restore targets);
  a trained conditioner's params sit beside the UNet's under its `param_key`."""
  size = build.latent_size(config.model)

  def init_fn(rng):
    r_unet, r_cond = jax.random.split(rng)
    lat = jnp.zeros((1, size, size, unet.in_channels))
    ctx = jnp.zeros((1, 1, unet.cross_attention_dim))
    labels = (jnp.zeros((1,), jnp.int32),) if unet.num_class_embeds else ()
    params = {"unet": unet.init(r_unet, lat, jnp.zeros((1,), jnp.int32), ctx, *labels)["params"]}
    if conditioner is not None and conditioner.trainable and conditioner.has_params():
      params[conditioner.param_key] = conditioner.init(r_cond)
    return init_train_state(params, tx, config.seed, ema=config.optimizer.ema_decay > 0)

  return init_fn


def estimate_scale(config, vae, vae_params, batches, mesh) -> float:
  """1/std of unscaled latents over `training.scale_estimate_batches` batches."""
  task = DiffusionTask(unet=None, vae=vae, conditioner=None, schedule=None,
                       prediction_type="epsilon")
  # Replicated output: every process reads all latents, so all estimate the same scale.
  fn = jax.jit(lambda p, b, r: encode_latents(task, p, b, r), out_shardings=startup.replicated(mesh))
  lats = [jax.device_get(fn(vae_params, b, jax.random.key(i)))
          for i, b in zip(range(config.training.scale_estimate_batches), batches)]
  return frozen_lib.estimate_scale_factor(lats)


def _check_widths(config: mc.ConfigDict) -> None:
  if build.conditioner_kind(config.model) not in TEXT_KINDS:
    return  # the other conditioners check their width when built
  width = build.context_width(config.model)
  if width != config.model.unet.cross_attention_dim:
    raise UserInputError(f"model.unet.cross_attention_dim={config.model.unet.cross_attention_dim} must "
                         f"equal the text encoder width {width}.")


def _check_buckets(config: mc.ConfigDict) -> None:
  """Aspect-ratio buckets come from a bucketed encode (latent shards) and must suit both networks."""
  if not config.data.buckets:
    return
  if config.data.kind != "latent_shards":
    raise UserInputError(f"data.buckets needs data.kind='latent_shards' (shards written by the "
                         f"encode command with these buckets), not {config.data.kind!r}.")
  buckets_lib.check_buckets(config)


def _frozen_from_pipeline(config: mc.ConfigDict) -> None:
  """Fine-tuning a diffusers pipeline: its vae/ (and CLIP text_encoder/, tokenizer/) fill the
  frozen.* keys the config leaves empty, so they match the imported UNet."""
  keys = ["vae"] + (["text_encoder", "tokenizer"] if build.conditioner_kind(config.model) == "clip"
                    else [])
  defaults = loader.pipeline_parts(config.training.init_checkpoint, keys)
  for key, path in defaults.items():
    if not config.frozen[key]:
      logging.info("frozen.%s = %s (from training.init_checkpoint)", key, path)
      config.frozen[key] = path


class DiffusionStage(Stage):
  """Stage 2 for the driver: frozen VAE (+ text encoder) as step arguments, UNet trained."""
  kind = DIFFUSION_KIND

  def __init__(self, config, workdir, mesh, global_batch):
    super().__init__(config, workdir, mesh, global_batch)
    _check_widths(config)
    _check_buckets(config)
    te = config.model.text_encoder
    kind = build.conditioner_kind(config.model)
    _frozen_from_pipeline(config)
    self.tokenizer = None
    if kind in TEXT_KINDS:
      from latent_diffusion_jax.data.tokenizers import load_tokenizer, prepare_run_tokenizer
      self.tokenizer = load_tokenizer(prepare_run_tokenizer(config, workdir))
      if te.kind == "ldm_transformer" and len(self.tokenizer) > te.ldm.vocab_size:
        raise UserInputError(f"model.text_encoder.ldm.vocab_size={te.ldm.vocab_size} is smaller than "
                             f"the tokenizer's {len(self.tokenizer)} tokens.")
    self.vae, self.vae_params, self.stored_scale = frozen_lib.load_vae(config)
    self.text_encoder, self.text_params = frozen_lib.load_text_encoder(config)
    frozen_lib.log_frozen(self.vae_params, self.text_params)
    self.unet = build.build_unet(config.model)
    empty = None if self.tokenizer is None else empty_prompt_ids(self.tokenizer, te.max_length)
    self.conditioner = build.build_conditioner(config.model, empty_ids=empty)
    if self.text_encoder is not None:  # the loaded (frozen) or configured text encoder
      self.conditioner = dataclasses.replace(self.conditioner, module=self.text_encoder)
    steps = config.training.num_steps
    self.tx, self.lr = make_optimizer(config.optimizer, steps), learning_rate_schedule(config.optimizer, steps)
    d = config.diffusion
    self.task = DiffusionTask(
        unet=self.unet, vae=self.vae, conditioner=self.conditioner, schedule=make_schedule(config), prediction_type=d.prediction_type,
        loss_weighting=d.loss_weighting, min_snr_gamma=d.min_snr_gamma, offset_noise=d.offset_noise,
        caption_dropout=d.caption_dropout, num_buckets=config.training.loss_buckets)
    self.init_fn = build_init_fn(config, self.unet, self.conditioner, self.tx)
    self.trained = {"unet": self.unet}
    if te.trainable and self.text_encoder is not None:
      self.trained["text_encoder"] = self.text_encoder
    self.scale: Optional[float] = None

  def _batches(self, log_indices: bool = False):
    return make_batches(self.config, self.workdir, self.global_batch, self.mesh,
                        tokenizer=self.tokenizer, vae=self.vae, vae_params=self.vae_params,
                        log_indices=log_indices)

  def data(self):
    return self._batches(log_indices=True)

  def _latent_scale(self, meta: Optional[dict], vae_params: Any) -> float:
    if meta is not None:
      return float(meta["latent_scale_factor"])
    if self.config.model.latent_scale_factor > 0:
      return float(self.config.model.latent_scale_factor)
    if self.stored_scale is not None:
      return self.stored_scale
    # A separate iterator, so estimating the scale does not move the training data position.
    _, batches = self._batches()
    return estimate_scale(self.config, self.vae, vae_params, batches, self.mesh)

  def start(self, meta, writer) -> Plan:
    config, te = self.config, self.config.model.text_encoder
    frozen: Dict[str, Any] = {"vae": self.vae_params}
    if self.text_params is not None:
      frozen["text_encoder"] = self.text_params
    if self.conditioner is not None and config.diffusion.caption_dropout > 0:
      frozen["null_inputs"] = null_inputs(self.conditioner)
    frozen = startup.put_replicated(frozen, self.mesh)
    self.scale = self._latent_scale(meta, frozen["vae"])
    logging.info("Latent scale factor %.6f", self.scale)
    if jax.process_index() == 0:
      save_frozen(self.workdir, vae_params=self.vae_params, text_params=self.text_params)
    hooks = []
    if config.training.sample_every > 0 and self.text_encoder is not None:
      from latent_diffusion_jax.training.sample_hook import SampleGridHook
      hooks.append(SampleGridHook(config, self.workdir, writer, self.scale, self.vae,
                                  self.text_encoder, self.unet, frozen, self.mesh))
    if config.evaluation.every > 0:
      from latent_diffusion_jax.training.eval_hook import EvalHook
      hooks.append(EvalHook(config, self.workdir, writer, self.scale, self.vae, self.text_encoder,
                            self.unet, frozen, self.mesh))
    step = make_train_step(self.task, self.tx, self.lr, ema_decay=config.optimizer.ema_decay,
                           grad_accum_steps=max(config.optimizer.grad_accum_steps, 1))
    return Plan(step=step, args=(frozen, startup.device_scalar(self.scale, self.mesh)), hooks=hooks,
                meta={"latent_scale_factor": self.scale},
                hparams={"latent_scale_factor": self.scale})

  def finish(self, result, writer) -> None:
    del writer
    result["latent_scale_factor"] = self.scale
