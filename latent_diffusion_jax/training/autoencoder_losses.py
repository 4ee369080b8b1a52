"""Loss terms of first-stage training (the LDM paper's `LPIPSWithDiscriminator` and its VQ twin).

Generator (autoencoder) loss per batch:
  nll    = rec / exp(logvar) + logvar, summed over pixels and averaged over the batch (KL, as LDM)
           or averaged over everything (VQ, as taming-transformers), with
           rec = |x - x_rec| + l2_weight (x - x_rec)^2 + perceptual_weight * LPIPS(x, x_rec)
  reg    = kl_weight * KL summed over latents (KL) or
           codebook_weight * mean(||sg(z) - e||^2 + beta ||z - sg(e)||^2) (VQ)
  adv    = lambda * disc_factor(step) * g_loss(D(x_rec))
  lambda = disc_weight * clip(||d nll / d W_last|| / (||d g_loss / d W_last|| + 1e-4), 0, 1e4),
           W_last the decoder's last conv kernel, no gradient through lambda.
Discriminator loss: disc_factor(step) * d_loss(D(x), D(sg(x_rec))).
"""

from typing import Callable

import jax
import jax.numpy as jnp
from latent_diffusion_jax.core.errors import UserInputError

DISC_LOSSES = ("hinge", "vanilla")


def hinge_d_loss(logits_real: jnp.ndarray, logits_fake: jnp.ndarray) -> jnp.ndarray:
  """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: jnp.ndarray, logits_fake: jnp.ndarray) -> jnp.ndarray:
  """0.5 * (mean softplus(-D(x)) + mean softplus(D(x_rec))): binary cross-entropy on logits."""
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def hinge_g_loss(logits_fake: jnp.ndarray) -> jnp.ndarray:
  """-mean D(x_rec) (the LDM generator loss)."""
  return -jnp.mean(logits_fake)


def vanilla_g_loss(logits_fake: jnp.ndarray) -> jnp.ndarray:
  """Non-saturating GAN loss mean softplus(-D(x_rec)) = -mean log sigmoid(D(x_rec))."""
  return jnp.mean(jax.nn.softplus(-logits_fake))


def adversarial_losses(kind: str):
  """(d_loss(logits_real, logits_fake), g_loss(logits_fake)) for "hinge" or "vanilla"."""
  if kind == "hinge":
    return hinge_d_loss, hinge_g_loss
  if kind == "vanilla":
    return vanilla_d_loss, vanilla_g_loss
  raise UserInputError(f"Unknown autoencoder.disc_loss {kind!r}; valid: {', '.join(DISC_LOSSES)}.")


def disc_factor_at(step: jnp.ndarray, start: int, factor: float) -> jnp.ndarray:
  """`factor` from step `start` on, 0 before (LDM's `adopt_weight`)."""
  return jnp.where(step >= start, jnp.float32(factor), jnp.float32(0.0))


def reconstruction_error(x: jnp.ndarray, x_rec: jnp.ndarray, l2_weight: float = 0.0,
                         perceptual: jnp.ndarray | None = None,
                         perceptual_weight: float = 0.0) -> jnp.ndarray:
  """Per-element error [B, H, W, C]: |e| + l2_weight e^2, plus the per-image perceptual distance
  broadcast over every element (as LDM adds its [B, 1, 1, 1] LPIPS to the L1 map)."""
  err = x_rec.astype(jnp.float32) - x.astype(jnp.float32)
  rec = jnp.abs(err) + l2_weight * err**2
  if perceptual is not None and perceptual_weight > 0:
    rec = rec + perceptual_weight * perceptual.astype(jnp.float32)[:, None, None, None]
  return rec


def nll_loss(rec: jnp.ndarray, logvar: jnp.ndarray, reduction: str = "sum") -> jnp.ndarray:
  """rec / exp(logvar) + logvar (a Laplace-like likelihood with a learned scale), reduced by
  "sum" (per-example sum, batch mean: LDM's KL loss) or "mean" (over all elements: taming's VQ loss)."""
  nll = rec * jnp.exp(-logvar) + logvar
  if reduction == "sum":
    return jnp.sum(nll) / rec.shape[0]
  if reduction == "mean":
    return jnp.mean(nll)
  raise UserInputError(f"Unknown reduction {reduction!r}; valid: sum, mean.")


def adaptive_weight(rec_grad: jnp.ndarray, gan_grad: jnp.ndarray, disc_weight: float,
                    eps: float = 1e-4, max_weight: float = 1e4) -> jnp.ndarray:
  """lambda = disc_weight * clip(||rec_grad|| / (||gan_grad|| + eps), 0, max_weight), no gradient.

  Args:
    rec_grad: gradient of the reconstruction (nll) loss w.r.t. the decoder's last layer.
    gan_grad: gradient of the generator's adversarial loss w.r.t. the same layer.
    disc_weight: the configured scale.
  """
  num = jnp.sqrt(jnp.sum(jnp.square(rec_grad.astype(jnp.float32))))
  den = jnp.sqrt(jnp.sum(jnp.square(gan_grad.astype(jnp.float32)))) + eps
  return jax.lax.stop_gradient(jnp.clip(num / den, 0.0, max_weight) * disc_weight)


def last_layer_grads(last_layer: Callable[[jnp.ndarray], jnp.ndarray], kernel: jnp.ndarray,
                     *cotangents: jnp.ndarray):
  """Gradients w.r.t. `kernel` of losses whose gradients w.r.t. `last_layer(kernel)` (the decoder
  output) are `cotangents`: one backward step through the last layer per loss."""
  out, vjp = jax.vjp(last_layer, kernel)
  return tuple(vjp(c.astype(out.dtype))[0] for c in cotangents)
