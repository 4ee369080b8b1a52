"""The first-stage train step: autoencoder (KL or VQ) and PatchGAN discriminator in one jitted update.

Params: {"vae": autoencoder, "logvar": scalar output log-variance, "discriminator": PatchGAN
(when adversarial)}; each top-level part has its own optax transform and optimizer state
(`partitioned`), so one `apply_update` (non-finite guard, EMA, health metrics) serves all three.
The losses are those of `autoencoder_losses`.

Gradients take one backward pass per network: the autoencoder's forward is linearized once
(`jax.vjp`), the losses' gradients w.r.t. its output (reconstruction through LPIPS and the
discriminator, regularizer) are formed first, the adaptive weight is computed from them at the
decoder's last conv (captured on the way forward), and their weighted sum is pulled back through
the autoencoder in a single VJP. Before `disc_start` the adversarial terms are scaled by 0.
"""

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import flax
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from latent_diffusion_jax.core import pixels
from latent_diffusion_jax.models.autoencoder import DiagonalGaussian
from latent_diffusion_jax.models.vq import (VQModel, codebook_statistics, ema_codebook_update)
from latent_diffusion_jax.training import autoencoder_losses as losses
from latent_diffusion_jax.evaluation.image_metrics import psnr
from latent_diffusion_jax.training.state import TrainState, global_norm
from latent_diffusion_jax.training.update import accumulate_gradients, apply_update

CODEBOOK_PATH = ("quantize", "embedding", "embedding")


@flax.struct.dataclass
class AutoencoderTrainState(TrainState):
  """TrainState plus state that is not trained by gradients.

  Attributes:
    model_state: {"codebook_ema": {"cluster_size", "embed_sum"}} for a VQ model with an EMA
      codebook, else {}.
  """
  model_state: Any


@dataclasses.dataclass(frozen=True)
class AutoencoderTask:
  """Static pieces of the step. Weights follow the LDM first-stage configs (see config.py)."""
  vae: nn.Module
  discriminator: Optional[nn.Module] = None
  lpips: Optional[nn.Module] = None
  kl_weight: float = 1e-6
  l2_weight: float = 0.0
  perceptual_weight: float = 0.0
  disc_start: int = 0
  disc_factor: float = 1.0
  disc_weight: float = 0.5
  disc_loss: str = "hinge"
  learn_logvar: bool = True
  codebook_weight: float = 1.0
  vq_beta: float = 0.25
  vq_ema_decay: float = 0.0
  vq_epsilon: float = 1e-5

  @property
  def is_vq(self) -> bool:
    return isinstance(self.vae, VQModel)

  @property
  def ema_codebook(self) -> bool:
    return self.is_vq and self.vq_ema_decay > 0

  @property
  def adversarial(self) -> bool:
    return self.discriminator is not None and self.disc_weight > 0 and self.disc_factor > 0


def partitioned(transforms: Dict[str, optax.GradientTransformation]) -> optax.GradientTransformation:
  """One optax transform per top-level key of the params dict, with separate states.

  Unlike optax.multi_transform it masks nothing, so every state leaf is a real array that the
  logical sharding rules can place.
  """
  def init(params):
    return {k: tx.init(params[k]) for k, tx in transforms.items()}

  def update(updates, state, params=None):
    out, new_state = {}, {}
    for k, tx in transforms.items():
      out[k], new_state[k] = tx.update(updates[k], state[k], None if params is None else params[k])
    return out, new_state

  return optax.GradientTransformation(init, update)


def _set_leaf(tree: Any, path: Tuple[str, ...], value: jnp.ndarray) -> Any:
  flat = traverse_util.flatten_dict(tree)
  flat[path] = value
  return traverse_util.unflatten_dict(flat)


def zero_updates_at(path: Tuple[str, ...]) -> optax.GradientTransformation:
  """Stateless transform that zeroes the update of the leaf at `path` (a dict path)."""
  def f(updates, params=None):
    del params
    flat = traverse_util.flatten_dict(updates)
    return _set_leaf(updates, path, jnp.zeros_like(flat[path]))
  return optax.stateless(f)


def make_optimizer(task: AutoencoderTask, generator_tx: optax.GradientTransformation,
                   discriminator_tx: optax.GradientTransformation,
                   logvar_tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """The combined transform over {"vae", "logvar"[, "discriminator"]}.

  An EMA codebook gets zero optimizer updates (so no weight decay either): the step sets it.
  """
  vae_tx = generator_tx
  if task.ema_codebook:
    vae_tx = optax.chain(generator_tx, zero_updates_at(CODEBOOK_PATH))
  parts = {"vae": vae_tx, "logvar": logvar_tx if task.learn_logvar else optax.set_to_zero()}
  if task.adversarial:
    parts["discriminator"] = discriminator_tx
  return partitioned(parts)


def _capture_last_layer(store: Dict[str, Any]):
  """Interceptor recording the input and an unbound copy of the decoder's output conv."""
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and module.scope is not None and \
        tuple(module.path[-2:]) == ("decoder", "conv_out"):
      store["h"] = args[0]
      store["conv"] = module.clone(parent=None, name=None)
    return next_fun(*args, **kwargs)
  return interceptor


def _autoencode(task: AutoencoderTask, vae_params: Any, x: jnp.ndarray, rng: jax.Array):
  """(reconstruction, per-example weighted regularizer), (metrics, codebook stats, last-layer input)."""
  store: Dict[str, Any] = {}
  with nn.intercept_methods(_capture_last_layer(store)):
    recon, extra = task.vae.apply({"params": vae_params}, x, rng)
  recon = recon.astype(jnp.float32)
  stats = {}
  if task.is_vq:
    z, q = extra
    codebook = 0.0 if task.ema_codebook else q.codebook_loss
    reg = task.codebook_weight * (codebook + task.vq_beta * q.commitment_loss)
    metrics = {"codebook_loss": q.codebook_loss, "commitment_loss": q.commitment_loss,
               "perplexity": q.perplexity}
    if task.ema_codebook:
      stats = codebook_statistics(z, q.indices, task.vae.num_vq_embeddings)
  else:
    kl = DiagonalGaussian(extra.astype(jnp.float32)).kl()
    reg = task.kl_weight * kl
    metrics = {"kl": kl}
  return (recon, reg), (metrics, stats, store["h"], store["conv"])


def loss_and_grads(task: AutoencoderTask, params: Any, batch: Dict[str, jnp.ndarray],
                   rng: jax.Array, step: jnp.ndarray, lpips_params: Any = None):
  """Generator loss and the gradients of every trained part for one (micro-)batch.

  Args:
    task: the step's static parts.
    params: {"vae", "logvar"[, "discriminator"]}.
    batch: {"images": uint8 or [-1, 1] float [B, H, W, C]}.
    rng: posterior sampling key (KL model).
    step: updates done so far (for disc_start).
    lpips_params: frozen LPIPS params when perceptual_weight > 0.

  Returns:
    ((loss, aux metrics), grads shaped like params), `accumulate_gradients`' contract. The
    discriminator's grads are those of its own loss, not of the generator loss.
  """
  x = pixels.to_float(batch["images"])
  b = x.shape[0]
  conv_box = {}

  def forward(vae_params):
    (recon, reg), (metrics, stats, h, conv) = _autoencode(task, vae_params, x, rng)
    conv_box["conv"] = conv
    return (recon, reg), (metrics, stats, h)

  (recon, reg), vae_vjp, (metrics, stats, h) = jax.vjp(forward, params["vae"], has_aux=True)

  def nll_fn(r, logvar):
    p = task.lpips.apply({"params": lpips_params}, x, r) if task.perceptual_weight > 0 else None
    rec = losses.reconstruction_error(x, r, task.l2_weight, p, task.perceptual_weight)
    # Each model keeps its reference's normalization, which also sets where the adaptive
    # weight's 1e4 clip bites: LDM's KL loss sums over pixels, taming's VQ loss averages.
    return losses.nll_loss(rec, logvar, "mean" if task.is_vq else "sum"), p

  (nll, perceptual), (d_recon, d_logvar) = jax.value_and_grad(nll_fn, argnums=(0, 1), has_aux=True)(
      recon, params["logvar"])
  loss = nll + jnp.mean(reg)
  # A fixed logvar gets no updates anyway; a zero gradient keeps it out of grad_norm.
  grads = {"logvar": d_logvar if task.learn_logvar else jnp.zeros_like(d_logvar)}
  aux = dict(metrics, nll=nll, l1=jnp.mean(jnp.abs(recon - x), axis=(1, 2, 3)), psnr=psnr(recon, x),
             logvar=params["logvar"])
  if perceptual is not None:
    aux["lpips"] = perceptual

  if task.adversarial:
    adv_cot, adv_loss, disc_grads, adv_metrics = _adversarial(
        task, params, x, recon, h, conv_box["conv"], d_recon, step)
    d_recon = d_recon + adv_cot
    loss = loss + adv_loss
    grads["discriminator"] = disc_grads
    aux.update(adv_metrics)

  (grads["vae"],) = vae_vjp((d_recon, jnp.full((b,), 1.0 / b, reg.dtype)))
  aux["codebook_stats"] = stats
  return (loss, aux), grads


def _adversarial(task, params, x, recon, h, conv, d_recon_nll, step):
  """Cotangent on the reconstruction, loss value, discriminator grads and metrics of the GAN part.

  Computed at every step and scaled by the disc factor (0 before `disc_start`), as LDM does: a
  lax.cond that skipped it ran about 10x slower than the plain ops on XLA:CPU.
  """
  disc = task.discriminator
  d_params = params["discriminator"]
  d_loss_fn, g_loss_fn = losses.adversarial_losses(task.disc_loss)
  factor = losses.disc_factor_at(step, task.disc_start, task.disc_factor)
  dec = params["vae"]["decoder"]["conv_out"]
  last_layer = lambda k: conv.apply({"params": {"kernel": k, "bias": dec["bias"]}}, h)

  g_fn = lambda r: g_loss_fn(disc.apply({"params": d_params}, r))
  g_loss, d_recon_g = jax.value_and_grad(g_fn)(recon)
  rec_k, gan_k = losses.last_layer_grads(last_layer, dec["kernel"], d_recon_nll, d_recon_g)
  weight = losses.adaptive_weight(rec_k, gan_k, task.disc_weight)

  def d_fn(dp):
    real = disc.apply({"params": dp}, x)
    fake = disc.apply({"params": dp}, jax.lax.stop_gradient(recon))
    return d_loss_fn(real, fake), (jnp.mean(real), jnp.mean(fake))

  (d_loss, (real, fake)), d_grads = jax.value_and_grad(d_fn, has_aux=True)(d_params)
  scale = weight * factor
  metrics = {"g_loss": g_loss, "d_loss": factor * d_loss, "disc_weight": weight,
             "disc_factor": factor, "logits_real": real, "logits_fake": fake}
  return (scale * d_recon_g, scale * g_loss, jax.tree.map(lambda g: factor * g, d_grads), metrics)


def _sum_codebook_stats(stats: Dict[str, jnp.ndarray], n: int) -> Dict[str, jnp.ndarray]:
  # accumulate_gradients concatenates aux over micro-batches along axis 0; re-split and sum.
  return {"counts": stats["counts"].reshape(-1, n).sum(0),
          "sums": stats["sums"].reshape(-1, n, stats["sums"].shape[-1]).sum(0)}


def make_train_step(task: AutoencoderTask, tx: optax.GradientTransformation,
                    learning_rate: Callable, *, ema_decay: float,
                    grad_accum_steps: int = 1) -> Callable:
  """Builds `train_step(state, batch[, lpips_params]) -> (state, metrics)`.

  `lpips_params` is a frozen step argument, needed when `task.perceptual_weight > 0`.
  """

  def train_step(state: AutoencoderTrainState, batch: Dict[str, jnp.ndarray],
                 lpips_params: Any = None) -> Tuple[AutoencoderTrainState, Dict]:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grad_fn = lambda p, mb, r: loss_and_grads(task, p, mb, r, state.step, lpips_params)
    (loss, aux), grads = accumulate_gradients(grad_fn, state.params, batch, rng, grad_accum_steps)
    stats = aux.pop("codebook_stats")
    if task.ema_codebook:
      state = _with_ema_codebook(task, state, stats, loss, grads)
    new_state, metrics = apply_update(state, grads, loss, tx, learning_rate, ema_decay)
    metrics.update({k: jnp.mean(v) for k, v in aux.items()})
    return new_state, metrics

  return train_step


def _with_ema_codebook(task, state, stats, loss, grads):
  """The state with the EMA-updated codebook in its params (kept as is on a non-finite step)."""
  n = task.vae.num_vq_embeddings
  old = state.model_state["codebook_ema"]
  new, codebook = ema_codebook_update(old, _sum_codebook_stats(stats, n), task.vq_ema_decay,
                                      task.vq_epsilon)
  finite = jnp.isfinite(loss) & jnp.isfinite(global_norm(grads))
  new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  old_codebook = traverse_util.flatten_dict(state.params["vae"])[CODEBOOK_PATH]
  codebook = jnp.where(finite, codebook.astype(old_codebook.dtype), old_codebook)
  vae = _set_leaf(state.params["vae"], CODEBOOK_PATH, codebook)
  return state.replace(params=dict(state.params, vae=vae), model_state={"codebook_ema": new})


def reconstruct(vae: nn.Module, params: Any, images: jnp.ndarray) -> jnp.ndarray:
  """Deterministic reconstruction (posterior mode / quantized latents) in [-1, 1]."""
  recon, _ = vae.apply({"params": params}, pixels.to_float(images))
  return jnp.clip(recon.astype(jnp.float32), -1.0, 1.0)


def scale_latents(vae: nn.Module, params: Any, images: jnp.ndarray) -> jnp.ndarray:
  """The latents stage 2 trains on, unscaled: posterior means (KL) or pre-quantization latents (VQ)."""
  out = vae.apply({"params": params}, pixels.to_float(images), method=vae.encode)
  return out if isinstance(vae, VQModel) else jnp.split(out, 2, axis=-1)[0]
