"""Stage "controlnet": a ControlNet trained on top of a frozen text-to-image model.

  python train.py --config configs/shapes_controlnet.py --workdir /tmp/cnet \
      --config.training.base_checkpoint=workdirs/shapes_ldm

Before the state: the base model (`training.base_checkpoint`, any source the one loader reads:
a stage-2 workdir, a diffusers pipeline, a single file, a native export) gives the frozen UNet,
first stage, text encoder, tokenizer and latent scale factor; its UNet must be the one
`model.unet` describes. A fresh run starts the ControlNet as a copy of the base UNet's encoder and
middle block with zero convolutions at zero (`controlnet_from_unet`); a workdir resumes as every
stage does. The base networks go to the step as arguments, placed on the mesh like the trained
params (by their logical axis names) and never in the optimizer state.

The checkpoints hold only the ControlNet; their metadata names the base model, so
`artifacts.workdir.load_controlnet` and the sampler pair them again.
"""

import os
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mc
from absl import logging

from latent_diffusion_jax.artifacts import loader
from latent_diffusion_jax.artifacts.workdir import CONTROLNET_KIND
from latent_diffusion_jax.core import parallel
from latent_diffusion_jax.core.errors import MissingInputError, UserInputError
from latent_diffusion_jax.data.batches import make_batches
from latent_diffusion_jax.models import build
from latent_diffusion_jax.models.controlnet import (controlnet_from_unet, example_inputs,
                                                    hint_channels)
from latent_diffusion_jax.training import foreign_init, startup
from latent_diffusion_jax.training.controlnet_step import ControlNetTask, make_train_step
from latent_diffusion_jax.models.conditioners.text import text_conditioner
from latent_diffusion_jax.training.diffusion_step import (empty_prompt_ids, init_train_state,
                                                          null_inputs)
from latent_diffusion_jax.training.stages.base import Plan, Stage
from latent_diffusion_jax.training.state import learning_rate_schedule, make_optimizer


def load_base(config: mc.ConfigDict):
  """The whole base model of `training.base_checkpoint` (a `ModelBundle`), checked against the
  config: its UNet must be the one `model.unet` describes (the ControlNet copies it)."""
  path = config.training.base_checkpoint
  if not path:
    raise UserInputError("stage='controlnet' needs training.base_checkpoint: the text-to-image "
                         "model the ControlNet is trained on (a stage-2 workdir, a diffusers "
                         "pipeline, a single file or a native export).")
  if not os.path.exists(path):
    raise MissingInputError(f"training.base_checkpoint={path!r} does not exist; give the base "
                            "model (a stage-2 workdir, a diffusers pipeline, a single file or a "
                            "native export).")
  bundle = loader.load_bundle(loader.Source(path, allow_pickle=config.frozen.allow_pickle),
                              dtype=build.dtype_of(config.model.dtype),
                              attention_impl=config.model.attention_impl)
  if bundle.unet_params is None or bundle.text_encoder is None:
    raise UserInputError(f"training.base_checkpoint={path!r} holds no text-conditioned UNet.")
  foreign_init.check_same_architecture(build.build_unet(config.model), bundle.unet, "model.unet",
                                       path)
  te = config.model.text_encoder
  if bundle.max_length != te.max_length:
    raise UserInputError(f"model.text_encoder.max_length={te.max_length} but the base model "
                         f"{path!r} reads {bundle.max_length} tokens.")
  if bundle.image_size != config.model.image_size:
    raise UserInputError(f"model.image_size={config.model.image_size} but the base model {path!r} "
                         f"was trained at {bundle.image_size}.")
  return bundle


def _check_control(config: mc.ConfigDict, vae) -> None:
  d = config.data
  has_control = (d.kind == "shapes" and d.control) or (d.kind == "webdataset" and d.control_member)
  if not has_control:
    raise UserInputError("stage='controlnet' trains on control images: set data.control "
                         "('outline' or 'segmentation') for the shapes data, or "
                         "data.control_member (e.g. 'control.png') for data.kind='webdataset'.")
  factor = 2 ** (len(config.model.controlnet.conditioning_embedding_out_channels) - 1)
  if factor != vae.downsample_factor:
    raise UserInputError(
        f"model.controlnet.conditioning_embedding_out_channels="
        f"{tuple(config.model.controlnet.conditioning_embedding_out_channels)} downsamples control "
        f"images {factor}x, but the first stage's latents are {vae.downsample_factor}x smaller "
        f"than the images: give {len(bin(vae.downsample_factor)) - 2} entries, e.g. "
        f"{hint_channels(vae.downsample_factor)}.")


def build_init_fn(config: mc.ConfigDict, controlnet, unet, unet_params, tx):
  """`init_fn(rng) -> TrainState` whose params are {"controlnet": a copy of the base UNet's encoder
  half, zero convolutions at zero, a random hint encoder} (`controlnet_from_unet`).

  The base UNet's params are constants of the (jitted, sharded) creation, so the copy is born
  sharded like any other state; the module's own init gives only the boxes (logical axis names).
  """
  cn = config.model.controlnet
  size = build.latent_size(config.model)

  def init_fn(rng):
    boxed = controlnet.init(rng, *example_inputs(controlnet, size))["params"]
    _, copied = controlnet_from_unet(
        unet, unet_params, rng, conditioning_channels=cn.conditioning_channels,
        conditioning_embedding_out_channels=tuple(cn.conditioning_embedding_out_channels))
    params = jax.tree.map(lambda box, value: box.replace_boxed(jnp.asarray(value, box.value.dtype))
                          if _is_box(box) else jnp.asarray(value, box.dtype),
                          boxed, copied, is_leaf=_is_box)
    return init_train_state({"controlnet": params}, tx, config.seed,
                            ema=config.optimizer.ema_decay > 0)

  return init_fn


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def place_by_names(module, params: Any, mesh, rules, max_length: int = 1) -> Any:
  """Frozen params on the mesh by their logical axis names, as the trained network would be."""
  boxed = build.abstract_module_params(module, max_length)
  return jax.device_put(params, parallel.logical_to_sharding(boxed, mesh, rules))


def place_frozen(base, max_length: int, mesh, rules) -> Dict[str, Any]:
  """The base UNet, first stage and text encoder placed like trained networks (FSDP / tensor
  axes shard them as they would the UNet)."""
  return {"unet": place_by_names(base.unet, base.unet_params, mesh, rules),
          "vae": place_by_names(base.vae, base.vae_params, mesh, rules),
          "text_encoder": place_by_names(base.text_encoder, base.text_encoder_params, mesh, rules,
                                         max_length)}


class ControlNetStage(Stage):
  """The driver's ControlNet stage: base UNet, VAE and text encoder frozen, ControlNet trained."""
  kind = CONTROLNET_KIND

  def __init__(self, config, workdir, mesh, global_batch):
    super().__init__(config, workdir, mesh, global_batch)
    self.base = load_base(config)
    _check_control(config, self.base.vae)
    from latent_diffusion_jax.data.tokenizers import load_tokenizer, prepare_run_tokenizer
    if not config.frozen.tokenizer and self.base.tokenizer_path:
      config.frozen.tokenizer = self.base.tokenizer_path
    self.tokenizer = load_tokenizer(prepare_run_tokenizer(config, workdir))
    self.controlnet = build.build_controlnet(config.model)
    steps = config.training.num_steps
    self.tx = make_optimizer(config.optimizer, steps)
    self.lr = learning_rate_schedule(config.optimizer, steps)
    self.task = ControlNetTask(
        controlnet=self.controlnet, unet=self.base.unet, vae=self.base.vae,
        conditioner=text_conditioner(
            "text", self.base.text_encoder, False, self.base.unet.cross_attention_dim,
            empty_prompt_ids(self.tokenizer, config.model.text_encoder.max_length)),
        schedule=self.base.diffusion.noise_schedule(),
        prediction_type=self.base.diffusion.prediction_type,
        caption_dropout=config.training.control_caption_dropout,
        conditioning_scale=config.model.controlnet.conditioning_scale,
        num_buckets=config.training.loss_buckets)
    self.init_fn = build_init_fn(config, self.controlnet, self.base.unet, self.base.unet_params,
                                 self.tx)
    self.scale = float(self.base.scaling_factor)
    logging.info("ControlNet on base %s (latent scale %.6f)",
                 self.base.metadata.get("source", config.training.base_checkpoint), self.scale)

  def data(self):
    return make_batches(self.config, self.workdir, self.global_batch, self.mesh,
                        tokenizer=self.tokenizer, vae=self.base.vae,
                        vae_params=self.base.vae_params,
                        log_indices=True)

  def start(self, meta, writer) -> Plan:
    del writer
    config, base = self.config, self.base
    trained_on = meta.get("base_checkpoint") if meta is not None else None
    if trained_on not in (None, config.training.base_checkpoint):
      logging.warning("Resuming a ControlNet trained on %s with training.base_checkpoint=%s.",
                      trained_on, config.training.base_checkpoint)
    rules = tuple(tuple(r) for r in config.mesh.logical_axis_rules)
    max_length = config.model.text_encoder.max_length
    frozen = place_frozen(base, max_length, self.mesh, rules)
    frozen["null_inputs"] = startup.put_replicated(null_inputs(self.task.conditioner), self.mesh)
    step = make_train_step(self.task, self.tx, self.lr, ema_decay=config.optimizer.ema_decay,
                           grad_accum_steps=max(config.optimizer.grad_accum_steps, 1))
    return Plan(step=step, args=(frozen, startup.device_scalar(self.scale, self.mesh)),
                meta={"latent_scale_factor": self.scale,
                      "base_checkpoint": config.training.base_checkpoint},
                hparams={"latent_scale_factor": self.scale})

  def finish(self, result, writer) -> None:
    del writer
    result["latent_scale_factor"] = self.scale
