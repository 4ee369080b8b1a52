"""The latent diffusion train step: a pure function (state, batch, frozen) -> (state, metrics).

Frozen networks (the VAE, a frozen text encoder) arrive as the `frozen` argument and are never in
the optimizer state. A batch holds latents as VAE moments ("moments") or pixels ("images", encoded
here), plus the fields of the run's conditioner (models/conditioners/): text as token ids
("input_ids", encoded here) or ready embeddings ("context"), "class_labels", a layout
("layout_boxes", "layout_classes"), precomputed "embeddings", or a user conditioner's own.
Caption dropout replaces a row's fields by the conditioner's null input (`frozen["null_inputs"]`).
"""

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from latent_diffusion_jax.core import pixels
from latent_diffusion_jax.diffusion import objectives, schedules
from latent_diffusion_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian
from latent_diffusion_jax.models.conditioners.base import Conditioner, Conditioning
from latent_diffusion_jax.training.state import TrainState
from latent_diffusion_jax.training.update import accumulate_gradients, apply_update


@dataclasses.dataclass(frozen=True)
class DiffusionTask:
  """The static pieces a train step closes over."""
  unet: nn.Module
  vae: AutoencoderKL
  conditioner: Optional[Conditioner]
  schedule: schedules.NoiseSchedule
  prediction_type: str
  loss_weighting: str = "uniform"
  min_snr_gamma: float = 5.0
  offset_noise: float = 0.0
  caption_dropout: float = 0.0
  num_buckets: int = 10


def encode_latents(task: DiffusionTask, vae_params: Any, batch: Dict[str, jnp.ndarray],
                   rng: jax.Array) -> jnp.ndarray:
  """Unscaled stage-2 latents of a batch, by the first stage's kind (`task.vae`).

  KL: a sample of the posterior given by "moments" (mean, logvar), or of encoding "images".
  VQ: the deterministic pre-quantization latents (encoder + quant_conv, not quantized; the LDM
  paper's choice): "latents" (latent shards), "moments" (the in-memory pre-encode cache, which
  stores a VQ model's latents under that batch key), or encoding "images".

  Raises:
    UserInputError: stored latents of the other kind (shape or field tells), e.g. KL moments fed
      to a VQ run.
  """
  from latent_diffusion_jax.core.errors import UserInputError
  from latent_diffusion_jax.models.build import first_stage_kind, first_stage_latent_channels
  # Without a first stage module the batch must carry KL moments (steps tested on stored latents).
  kind = "kl" if task.vae is None else first_stage_kind(task.vae)
  if kind == "vq":
    channels = first_stage_latent_channels(task.vae)
    stored = batch.get("latents", batch.get("moments"))
    if stored is None:
      stored = task.vae.apply({"params": vae_params}, pixels.to_float(batch["images"]),
                              method=task.vae.encode)
    if stored.shape[-1] != channels:
      raise UserInputError(
          f"The batch holds {stored.shape[-1]}-channel latents but the VQ first stage's "
          f"pre-quantization latents have {channels} (KL moments have twice a KL model's latent "
          "channels): encode the data with this first stage (autoencoder.kind='vq').")
    return jax.lax.stop_gradient(stored.astype(jnp.float32))
  if "latents" in batch:
    raise UserInputError("The batch holds a VQ model's deterministic latents, but the first stage "
                         "is KL (autoencoder.kind='kl'); set autoencoder.kind='vq' with the VQ "
                         "first stage that encoded them as frozen.vae.")
  if "moments" in batch:
    moments = batch["moments"].astype(jnp.float32)
  else:
    moments = task.vae.apply({"params": vae_params}, pixels.to_float(batch["images"]),
                             method=task.vae.encode).astype(jnp.float32)
  return jax.lax.stop_gradient(DiagonalGaussian(moments).sample(rng))


def _conditioning(task: DiffusionTask, params: Any, frozen: Any, batch: Dict[str, jnp.ndarray],
                  rng: jax.Array, b: int) -> Conditioning:
  """The conditioner's output on the batch, with caption dropout to its null input (for
  classifier-free guidance); an all-zero length-1 context for unconditional models."""
  cond = task.conditioner
  if cond is None:  # ready embeddings as they are (benchmarks), or nothing to attend to
    if "context" in batch:
      return Conditioning(batch["context"])
    return Conditioning(jnp.zeros((b, 1, task.unet.cross_attention_dim), jnp.float32))
  inputs = {k: batch[k] for k in (*cond.fields, *cond.optional_fields) if k in batch}
  if task.caption_dropout > 0:
    drop = jax.random.bernoulli(rng, task.caption_dropout, (b,))
    null = frozen["null_inputs"]
    inputs = {k: jnp.where(drop.reshape((b,) + (1,) * (v.ndim - 1)), null[k].astype(v.dtype), v)
              for k, v in inputs.items()}
  cond_params = params.get(cond.param_key) if cond.trainable else frozen.get(cond.param_key)
  out = cond.encode(cond_params, inputs)
  return out if cond.trainable else jax.tree.map(jax.lax.stop_gradient, out)


def _loss_fn(task: DiffusionTask, params: Any, frozen: Any, batch: Dict[str, jnp.ndarray],
             rng: jax.Array, scale_factor: jnp.ndarray):
  r_lat, r_t, r_noise, r_drop, r_dropout = jax.random.split(rng, 5)
  z = encode_latents(task, frozen["vae"], batch, r_lat) * scale_factor
  b = z.shape[0]
  cond = _conditioning(task, params, frozen, batch, r_drop, b)
  t = jax.random.randint(r_t, (b,), 0, task.schedule.num_timesteps)
  noise = objectives.sample_noise(r_noise, z.shape, task.offset_noise)
  x_t = schedules.add_noise(task.schedule, z, noise, t)
  labels = cond.class_labels if cond.class_labels is not None else batch.get("class_labels")
  if task.unet.num_class_embeds is None:
    labels = None
  out = task.unet.apply({"params": params["unet"]}, x_t, t, cond.context, labels,
                        deterministic=False, rngs={"dropout": r_dropout})
  target = objectives.prediction_target(task.prediction_type, task.schedule, z, noise, t)
  weights = objectives.loss_weights(task.loss_weighting, task.prediction_type, task.schedule, t,
                                    task.min_snr_gamma)
  per_example = objectives.diffusion_loss(out.astype(jnp.float32), target, weights)
  return per_example.mean(), (per_example, t)


def make_train_step(task: DiffusionTask, tx: optax.GradientTransformation,
                    learning_rate: Callable[[jnp.ndarray], jnp.ndarray], *, ema_decay: float,
                    grad_accum_steps: int = 1) -> Callable:
  """Builds `train_step(state, batch, frozen, scale_factor) -> (state, metrics)`.

  With `grad_accum_steps` k > 1 the batch holds k micro-batches (leading dim k * B) whose gradients
  are averaged before one update (see training/update.py, which also guards non-finite steps).
  """

  def train_step(state: TrainState, batch: Dict[str, jnp.ndarray], frozen: Any,
                 scale_factor: jnp.ndarray) -> Tuple[TrainState, Dict[str, jnp.ndarray]]:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grad_fn = jax.value_and_grad(lambda p, mb, r: _loss_fn(task, p, frozen, mb, r, scale_factor),
                                 has_aux=True)
    (loss, (per_example, t)), grads = accumulate_gradients(grad_fn, state.params, batch, rng,
                                                           grad_accum_steps)
    new_state, metrics = apply_update(state, grads, loss, tx, learning_rate, ema_decay)
    metrics["bucket_loss_sums"], metrics["bucket_counts"] = objectives.loss_per_timestep_bucket(
        per_example, t, task.schedule.num_timesteps, task.num_buckets)
    return new_state, metrics

  return train_step


def init_train_state(params: Any, tx: optax.GradientTransformation, rng_seed: int,
                     ema: bool) -> TrainState:
  """A fresh TrainState around `params` (call inside jit with out_shardings to create it sharded)."""
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params) if ema else None,
      rng=jax.random.key_data(jax.random.key(rng_seed)),
      nonfinite_skips=jnp.zeros((), jnp.int32))


def null_inputs(conditioner: Optional[Conditioner]) -> Dict[str, np.ndarray]:
  """The conditioner's null input for one example (leading dim dropped), for `frozen`."""
  if conditioner is None:
    return {}
  return {k: v[0] for k, v in conditioner.null_inputs(1).items()}


def empty_prompt_ids(tokenizer, max_length: int) -> np.ndarray:
  """Token ids of the empty prompt, the unconditional input of classifier-free guidance."""
  from latent_diffusion_jax.data.tokenizers import tokenize
  return tokenize(tokenizer, [""], max_length)[0]
