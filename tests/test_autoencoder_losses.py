"""First-stage loss terms on known inputs, and the step's gradients against direct jax.grad.

The step pulls one combined cotangent back through the autoencoder and computes the adaptive weight
from last-layer gradients of the captured decoder output conv; here the same quantities come from
plain jax.grad over the whole param tree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from latent_diffusion_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian
from latent_diffusion_jax.models.discriminator import PatchDiscriminator
from latent_diffusion_jax.models.lpips import LPIPS
from latent_diffusion_jax.training import autoencoder_losses as L
from latent_diffusion_jax.training import autoencoder_step as S
from tiny_bundles import _init


def test_hinge_d_loss_hand_computed():
  real = jnp.array([2.0, 0.5, -1.0])   # relu(1 - r) = 0, 0.5, 2   -> mean 2.5 / 3
  fake = jnp.array([-2.0, 0.0, 1.5])   # relu(1 + f) = 0, 1, 2.5   -> mean 3.5 / 3
  assert float(L.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (2.5 / 3 + 3.5 / 3))
  assert float(L.hinge_g_loss(fake)) == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3)


def test_vanilla_d_loss_hand_computed():
  real = jnp.array([0.0, 2.0])
  fake = jnp.array([0.0, -1.0])
  sp = lambda v: np.log1p(np.exp(v))
  expected = 0.5 * (np.mean([sp(-0.0), sp(-2.0)]) + np.mean([sp(0.0), sp(-1.0)]))
  assert float(L.vanilla_d_loss(real, fake)) == pytest.approx(expected, rel=1e-6)
  # Non-saturating generator loss: -log sigmoid(D(x_rec)).
  assert float(L.vanilla_g_loss(fake)) == pytest.approx(np.mean([sp(0.0), sp(1.0)]), rel=1e-6)
  assert float(L.vanilla_d_loss(jnp.zeros(4), jnp.zeros(4))) == pytest.approx(np.log(2.0))
  with pytest.raises(ValueError, match="hinge, vanilla"):
    L.adversarial_losses("wgan")


def test_disc_factor_schedule():
  assert [float(L.disc_factor_at(jnp.array(s), 10, 0.7)) for s in (0, 9, 10, 11)] == \
      pytest.approx([0.0, 0.0, 0.7, 0.7])


def test_reconstruction_and_nll_with_logvar():
  x = jnp.zeros((2, 1, 2, 1))
  r = jnp.array([0.5, -1.0, 0.25, 0.0]).reshape(2, 1, 2, 1)
  rec = L.reconstruction_error(x, r, l2_weight=2.0, perceptual=jnp.array([0.1, 0.2]),
                               perceptual_weight=3.0)
  # |e| + 2 e^2 + 3 * lpips(example)
  expected = np.array([0.5 + 0.5 + 0.3, 1.0 + 2.0 + 0.3, 0.25 + 0.125 + 0.6, 0.6]).reshape(2, 1, 2, 1)
  np.testing.assert_allclose(rec, expected, rtol=1e-6)
  logvar = jnp.array(0.5)
  nll = L.nll_loss(rec, logvar)
  assert float(nll) == pytest.approx((expected.sum() * np.exp(-0.5) + 4 * 0.5) / 2, rel=1e-6)
  # logvar = 0 leaves the summed error per example.
  assert float(L.nll_loss(rec, jnp.array(0.0))) == pytest.approx(expected.sum() / 2, rel=1e-6)
  # taming's VQ normalization: the mean over all elements.
  assert float(L.nll_loss(rec, logvar, "mean")) == pytest.approx(
      expected.mean() * np.exp(-0.5) + 0.5, rel=1e-6)


def test_adaptive_weight_formula():
  a, b = jnp.array([3.0, 4.0]), jnp.array([0.0, 0.5])
  assert float(L.adaptive_weight(a, b, 0.5)) == pytest.approx(0.5 * 5.0 / (0.5 + 1e-4), rel=1e-6)
  # Clipped to [0, 1e4] before disc_weight.
  assert float(L.adaptive_weight(a, jnp.zeros(2), 2.0)) == pytest.approx(2.0 * 1e4)


def test_step_gradients_equal_direct_grad():
  vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                      norm_num_groups=4, mid_block_attention=False)
  disc = PatchDiscriminator(channels=8, num_layers=1)
  lpips = LPIPS(channels=(4, 4, 8, 8, 8))
  task = S.AutoencoderTask(vae=vae, discriminator=disc, lpips=lpips, kl_weight=1e-2, l2_weight=0.5,
                           perceptual_weight=0.7, disc_start=0, disc_weight=0.5, disc_loss="vanilla")
  x0 = jnp.zeros((1, 16, 16, 3))
  params = {"vae": _init(vae, x0, seed=0), "logvar": jnp.array(0.3, jnp.float32),
            "discriminator": _init(disc, x0, seed=1)}
  lp = _init(lpips, x0, x0, seed=2)
  lp = jax.tree.map(jnp.abs, lp)
  images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  rng = jax.random.key(3)
  d_loss_fn, g_loss_fn = L.adversarial_losses("vanilla")

  def both(params):
    (loss, aux), grads = S.loss_and_grads(task, params, {"images": images}, rng, jnp.array(5), lp)
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0

    def parts(p):
      recon, moments = vae.apply({"params": p["vae"]}, x, rng)
      rec = L.reconstruction_error(x, recon, 0.5, lpips.apply({"params": lp}, x, recon), 0.7)
      nll = L.nll_loss(rec, p["logvar"])
      g = g_loss_fn(disc.apply({"params": p["discriminator"]}, recon))
      return nll, g, 1e-2 * jnp.mean(DiagonalGaussian(moments).kl())

    last = lambda g: g["vae"]["decoder"]["conv_out"]["kernel"]
    g_nll = jax.grad(lambda p: parts(p)[0])(params)
    g_gan = jax.grad(lambda p: parts(p)[1])(params)
    weight = 0.5 * jnp.clip(jnp.linalg.norm(last(g_nll)) / (jnp.linalg.norm(last(g_gan)) + 1e-4),
                            0, 1e4)
    total = lambda p: (lambda n, g, k: n + k + weight * g)(*parts(p))
    direct = jax.value_and_grad(total)(params)

    def d_total(dp):
      recon, _ = vae.apply({"params": params["vae"]}, x, rng)
      return d_loss_fn(disc.apply({"params": dp}, x), disc.apply({"params": dp}, recon))

    return (loss, aux, grads), direct, weight, jax.grad(d_total)(params["discriminator"])

  (loss, aux, grads), (direct_loss, direct_grads), weight, d_grads = jax.jit(both)(params)
  assert float(aux["disc_weight"]) == pytest.approx(float(weight), rel=1e-4)
  assert float(aux["disc_weight"]) > 0
  assert float(loss) == pytest.approx(float(direct_loss), rel=1e-5)
  for name in ("vae", "logvar"):
    for a, b in zip(jax.tree.leaves(grads[name]), jax.tree.leaves(direct_grads[name])):
      np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4 * float(np.abs(b).max()) + 1e-7)
  for a, b in zip(jax.tree.leaves(grads["discriminator"]), jax.tree.leaves(d_grads)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6)


def test_partitioned_keeps_separate_states_and_zeroes_codebook():
  params = {"vae": {"quantize": {"embedding": {"embedding": jnp.ones((4, 2))}}, "w": jnp.ones(3)},
            "discriminator": {"w": jnp.ones(2)}}
  tx = S.partitioned({"vae": optax.chain(optax.sgd(1.0), S.zero_updates_at(S.CODEBOOK_PATH)),
                      "discriminator": optax.sgd(0.5)})
  state = tx.init(params)
  assert set(state) == {"vae", "discriminator"}
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_array_equal(updates["vae"]["quantize"]["embedding"]["embedding"], 0.0)
  np.testing.assert_array_equal(updates["vae"]["w"], -1.0)
  np.testing.assert_array_equal(updates["discriminator"]["w"], -0.5)
