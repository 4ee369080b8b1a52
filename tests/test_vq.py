"""VQ regularizer math (straight-through gradient, losses, EMA codebook), the VQ step, and parity
with diffusers' VQModel (encode / quantize / decode, import and export)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from latent_diffusion_jax.models import vq as vq_lib
from latent_diffusion_jax.models.vq import VectorQuantizer, VQModel
from latent_diffusion_jax.training import autoencoder_step as S
from tiny_bundles import _init
from torch_reference import randomize

ATOL = 1e-4


def _quantizer(n=6, d=3, seed=0):
  q = VectorQuantizer(n, d)
  codebook = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
  return q, {"embedding": {"embedding": jnp.asarray(codebook)}}, codebook


def test_nearest_codes_and_losses_match_numpy():
  q, params, codebook = _quantizer()
  z = np.random.default_rng(1).standard_normal((2, 3, 4, 3)).astype(np.float32)
  out = q.apply({"params": params}, jnp.asarray(z))
  dist = ((z[..., None, :] - codebook) ** 2).sum(-1)
  idx = dist.argmin(-1)
  np.testing.assert_array_equal(out.indices, idx)
  zq = codebook[idx]
  np.testing.assert_allclose(out.latents, zq, atol=1e-6)
  mse = ((z - zq) ** 2).mean(axis=(1, 2, 3))
  # Both losses equal ||z - e||^2 in value; they differ in which side receives the gradient.
  np.testing.assert_allclose(out.codebook_loss, mse, rtol=1e-5)
  np.testing.assert_allclose(out.commitment_loss, mse, rtol=1e-5)
  counts = np.bincount(idx.reshape(-1), minlength=6) / idx.size
  p = counts[counts > 0]
  assert float(out.perplexity) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-5)


def test_straight_through_gradient_and_loss_gradients():
  q, params, codebook = _quantizer()
  z = jnp.asarray(np.random.default_rng(2).standard_normal((1, 2, 2, 3)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(3).standard_normal((1, 2, 2, 3)), jnp.float32)
  f = lambda v: jnp.sum(jnp.sin(v) * w)
  zq = q.apply({"params": params}, z).latents
  g_through = jax.grad(lambda v: f(q.apply({"params": params}, v).latents))(z)
  np.testing.assert_allclose(g_through, jax.grad(f)(zq), rtol=1e-6)
  # Commitment moves only the encoder output, the codebook loss only the codebook.
  loss = lambda p, v, name: jnp.sum(getattr(q.apply({"params": p}, v), name))
  gp, gz = jax.grad(loss, argnums=(0, 1))(params, z, "commitment_loss")
  assert float(jnp.abs(gp["embedding"]["embedding"]).max()) == 0.0
  np.testing.assert_allclose(gz, 2 * (z - zq) / z[0].size, rtol=1e-5)
  gp, gz = jax.grad(loss, argnums=(0, 1))(params, z, "codebook_loss")
  assert float(jnp.abs(gz).max()) == 0.0
  assert float(jnp.abs(gp["embedding"]["embedding"]).max()) > 0


def test_ema_codebook_update_math():
  rng = np.random.default_rng(4)
  n, d, decay, eps = 5, 2, 0.9, 1e-5
  size = rng.uniform(0.5, 2, n).astype(np.float32)
  embed_sum = rng.standard_normal((n, d)).astype(np.float32)
  z = rng.standard_normal((1, 3, 3, d)).astype(np.float32)
  idx = rng.integers(0, n - 1, (1, 3, 3))  # the last code receives nothing
  stats = vq_lib.codebook_statistics(jnp.asarray(z), jnp.asarray(idx), n)
  new, codebook = vq_lib.ema_codebook_update(
      {"cluster_size": jnp.asarray(size), "embed_sum": jnp.asarray(embed_sum)}, stats, decay, eps)
  counts = np.bincount(idx.reshape(-1), minlength=n)
  sums = np.stack([z.reshape(-1, d)[idx.reshape(-1) == i].sum(0) for i in range(n)])
  exp_size = decay * size + (1 - decay) * counts
  exp_sum = decay * embed_sum + (1 - decay) * sums
  total = exp_size.sum()
  smoothed = (exp_size + eps) / (total + n * eps) * total
  np.testing.assert_allclose(new["cluster_size"], exp_size, rtol=1e-6)
  np.testing.assert_allclose(new["embed_sum"], exp_sum, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(codebook, exp_sum / smoothed[:, None], rtol=1e-5)
  # Fresh statistics reproduce the codebook they were made from.
  init = vq_lib.init_codebook_ema(jnp.asarray(embed_sum))
  zero = {"counts": jnp.zeros(n), "sums": jnp.zeros((n, d))}
  _, same = vq_lib.ema_codebook_update(init, zero, 1.0, 0.0)
  np.testing.assert_allclose(same, embed_sum, rtol=1e-6)


def test_vq_step_sets_ema_codebook_and_trains():
  vq = VQModel(block_out_channels=(8, 16), layers_per_block=1, latent_channels=3,
               num_vq_embeddings=8, norm_num_groups=4, mid_block_attention=False)
  task = S.AutoencoderTask(vae=vq, vq_ema_decay=0.8, perceptual_weight=0.0, disc_weight=0.0)
  tx = S.make_optimizer(task, optax.adamw(1e-3, weight_decay=0.1), None, optax.adam(1e-3))
  params = {"vae": _init(vq, jnp.zeros((1, 8, 8, 3)), seed=0), "logvar": jnp.zeros(())}
  codebook = params["vae"]["quantize"]["embedding"]["embedding"]
  ema = vq_lib.init_codebook_ema(jnp.asarray(codebook))
  state = S.AutoencoderTrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema_params=None,
      rng=jax.random.key_data(jax.random.key(0)), nonfinite_skips=jnp.zeros((), jnp.int32),
      model_state={"codebook_ema": ema})
  images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
  step = jax.jit(S.make_train_step(task, tx, lambda s: 1e-3, ema_decay=0.0, grad_accum_steps=2))
  new, metrics = step(state, {"images": images})
  # Expected: EMA statistics of the pre-update encoder's assignments over both micro-batches.
  x = jnp.asarray(images, jnp.float32) / 127.5 - 1
  z = vq.apply({"params": params["vae"]}, x, method=vq.encode)
  idx = vq_lib.nearest_codes(z, codebook)
  exp_ema, exp_codebook = vq_lib.ema_codebook_update(
      ema, vq_lib.codebook_statistics(z, idx, 8), 0.8, 1e-5)
  np.testing.assert_allclose(new.params["vae"]["quantize"]["embedding"]["embedding"], exp_codebook,
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new.model_state["codebook_ema"]["cluster_size"],
                             exp_ema["cluster_size"], rtol=1e-5)
  assert bool(metrics["finite"]) and 1.0 <= float(metrics["perplexity"]) <= 8.0
  assert float(jnp.abs(new.params["vae"]["encoder"]["conv_in"]["kernel"] -
                       params["vae"]["encoder"]["conv_in"]["kernel"]).max()) > 0


@pytest.fixture(scope="module")
def vq_pair(tmp_path_factory):
  pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch_vq = diffusers.VQModel(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
      latent_channels=3, num_vq_embeddings=16, norm_num_groups=8, sample_size=16)
  randomize(torch_vq, seed=5)
  path = tmp_path_factory.mktemp("vq")
  torch_vq.save_pretrained(path, safe_serialization=True)
  from latent_diffusion_jax.interop.diffusers_vq import load_vq_model
  vq, params, _ = load_vq_model(str(path))
  return torch_vq, vq, params


@pytest.mark.parity
def test_vq_model_matches_diffusers(vq_pair):
  import torch
  torch_vq, vq, params = vq_pair
  x = np.random.default_rng(6).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():
    h = torch_vq.encode(torch.from_numpy(x)).latents
    zq, commit, (_, _, idx) = torch_vq.quantize(h)
    ref_dec = torch_vq.decode(h).sample.numpy()
    ref_unquantized = torch_vq.decode(h, force_not_quantize=True).sample.numpy()
  to_nhwc = lambda a: jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))
  v = {"params": params}
  ours_h = vq.apply(v, to_nhwc(x), method=vq.encode)
  np.testing.assert_allclose(np.asarray(ours_h).transpose(0, 3, 1, 2), h.numpy(), atol=ATOL, rtol=0)
  quant = vq.apply(v, to_nhwc(h.numpy()), method=vq.quantize_latents)
  np.testing.assert_array_equal(np.asarray(quant.indices).reshape(-1), idx.numpy().reshape(-1))
  np.testing.assert_allclose(np.asarray(quant.latents).transpose(0, 3, 1, 2), zq.numpy(), atol=ATOL)
  # diffusers' (legacy) loss is codebook + beta * commitment, both means over the batch.
  assert float(jnp.mean(quant.codebook_loss + 0.25 * quant.commitment_loss)) == \
      pytest.approx(float(commit), rel=1e-4)
  dec = vq.apply(v, to_nhwc(h.numpy()), method=vq.decode)
  np.testing.assert_allclose(np.asarray(dec).transpose(0, 3, 1, 2), ref_dec, atol=ATOL, rtol=0)
  dec = vq.apply(v, to_nhwc(h.numpy()), True, method=vq.decode)
  np.testing.assert_allclose(np.asarray(dec).transpose(0, 3, 1, 2), ref_unquantized, atol=ATOL,
                             rtol=0)
  assert np.abs(ref_dec).max() > 0.1


@pytest.mark.parity
def test_vq_export_round_trips_through_diffusers(vq_pair, tmp_path):
  import diffusers
  torch_vq, vq, params = vq_pair
  from latent_diffusion_jax.interop.diffusers_vq import export_vq_model, load_vq_model
  out = export_vq_model(vq, params, str(tmp_path / "vq"), sample_size=16, scaling_factor=0.5)
  reloaded = diffusers.VQModel.from_pretrained(out, local_files_only=True)
  assert reloaded.config.scaling_factor == 0.5
  theirs = torch_vq.state_dict()
  for k, v in reloaded.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), theirs[k].numpy(), err_msg=k)
  vq2, params2, _ = load_vq_model(out)
  assert vq2 == vq
  for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
