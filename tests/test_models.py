"""Shapes, dtypes, logical axes, attention implementations and precision of the model modules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion_jax.core.config import load_config_file
from latent_diffusion_jax.models.attention import dot_product_attention
from latent_diffusion_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian
from latent_diffusion_jax.models.build import build_unet, build_vae
from latent_diffusion_jax.models.unet import UNet2DConditionModel, heads_per_level
from latent_diffusion_jax.cli.summary import summarize


@pytest.mark.parametrize("config,expected", [
    ("configs/sd15.py", dict(unet=859_520_964, vae=83_653_863, text_encoder=123_060_480)),
    ("configs/sd21_base.py", dict(unet=865_910_724, vae=83_653_863, text_encoder=340_387_840)),
    ("configs/sd21_base.py:768-v", dict(unet=865_910_724, vae=83_653_863, text_encoder=340_387_840)),
])
def test_full_size_param_counts_without_allocation(config, expected):
  assert summarize(load_config_file(config)) == expected


def _qkv(seed, b=2, lq=5, lk=7, h=3, d=8):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, lq, h, d)), jax.random.normal(ks[1], (b, lk, h, d)),
          jax.random.normal(ks[2], (b, lk, h, d)))


@pytest.mark.parametrize("impl", ["jax", "chunked", "auto"])
def test_attention_implementations_agree(impl):
  q, k, v = _qkv(0)
  ref = dot_product_attention(q, k, v, implementation="xla")
  np.testing.assert_allclose(dot_product_attention(q, k, v, implementation=impl), ref, atol=1e-5)
  mask = jax.random.bernoulli(jax.random.key(1), 0.7, (2, 1, 5, 7)).at[..., 0].set(True)
  np.testing.assert_allclose(dot_product_attention(q, k, v, mask=mask, implementation=impl),
                             dot_product_attention(q, k, v, mask=mask, implementation="xla"), atol=1e-5)
  q, k, v = _qkv(2, lq=6, lk=6)
  np.testing.assert_allclose(dot_product_attention(q, k, v, is_causal=True, implementation=impl),
                             dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
                             atol=1e-5)


def test_attention_matches_direct_formula_and_rejects_unknown_impl():
  q, k, v = _qkv(3)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  np.testing.assert_allclose(dot_product_attention(q, k, v), np.einsum("bhqk,bkhd->bqhd", w, v),
                             atol=1e-5)
  with pytest.raises(ValueError, match="valid: xla, jax, cudnn, chunked, auto"):
    dot_product_attention(q, k, v, implementation="flash")


def _tiny_unet(**kw):
  base = dict(block_out_channels=(32, 64), attention_levels=(True, False), layers_per_block=1,
              num_heads=4, cross_attention_dim=16, norm_num_groups=8)
  base.update(kw)
  return UNet2DConditionModel(**base)


def _unet_inputs(in_channels=4, size=8):
  k = jax.random.split(jax.random.key(0), 2)
  return (jax.random.normal(k[0], (2, size, size, in_channels)), jnp.array([3, 700]),
          jax.random.normal(k[1], (2, 5, 16)))


def test_every_param_has_logical_axis_names():
  unet = _tiny_unet(num_class_embeds=3)
  x, t, ctx = _unet_inputs()
  boxed = jax.eval_shape(unet.init, jax.random.key(0), x, t, ctx, jnp.array([0, 2]))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda l: isinstance(l, nn.Partitioned))
  assert leaves and all(isinstance(l, nn.Partitioned) for l in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim
  vae = AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
  boxed = jax.eval_shape(vae.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
  assert all(isinstance(l, nn.Partitioned)
             for l in jax.tree.leaves(boxed, is_leaf=lambda l: isinstance(l, nn.Partitioned)))


@pytest.mark.parametrize("in_channels,remat,class_embeds", [(4, False, None), (9, True, 3)])
def test_unet_shapes_dtypes_and_finiteness(in_channels, remat, class_embeds):
  unet = _tiny_unet(in_channels=in_channels, remat=remat, num_class_embeds=class_embeds,
                    transformer_depth=2)
  x, t, ctx = _unet_inputs(in_channels)
  labels = (jnp.array([0, 2]),) if class_embeds else ()
  params = jax.jit(unet.init)(jax.random.key(0), x, t, ctx, *labels)
  out = jax.jit(unet.apply)(params, x, t, ctx, *labels)
  assert out.shape == (2, 8, 8, 4) and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()
  # Gradients flow through the rematerialized blocks too.
  g = jax.jit(jax.grad(lambda p: jnp.mean(unet.apply(p, x, t, ctx, *labels) ** 2)))(params)
  assert all(np.isfinite(np.asarray(l)).all() for l in jax.tree.leaves(g))


def test_unet_without_class_labels_errors_clearly():
  unet = _tiny_unet(num_class_embeds=3)
  with pytest.raises(ValueError, match="pass class_labels"):
    unet.init(jax.random.key(0), *_unet_inputs())


def test_heads_as_count_or_width():
  assert heads_per_level((320, 640), 8, None) == ((8, 40), (8, 80))
  assert heads_per_level((320, 640), None, 64) == ((5, 64), (10, 64))
  with pytest.raises(ValueError, match="exactly one"):
    heads_per_level((320,), 8, 64)
  with pytest.raises(ValueError, match="does not divide"):
    heads_per_level((320,), None, 48)


@pytest.mark.parametrize("chans,factor", [((16, 32, 32), 4), ((16, 16, 32, 32), 8),
                                          ((16, 16, 16, 32, 32), 16)])
def test_vae_downsampling_factors(chans, factor):
  vae = AutoencoderKL(block_out_channels=chans, layers_per_block=1, norm_num_groups=8)
  x = jax.random.uniform(jax.random.key(0), (1, 32, 32, 3), minval=-1, maxval=1)
  params = vae.init(jax.random.key(1), x)
  recon, moments = jax.jit(vae.apply)(params, x, jax.random.key(2))
  assert vae.downsample_factor == factor
  assert moments.shape == (1, 32 // factor, 32 // factor, 8)
  assert recon.shape == x.shape and np.isfinite(np.asarray(recon)).all()
  post = DiagonalGaussian(moments)
  assert post.kl().shape == (1,) and float(post.kl()[0]) >= 0


def test_posterior_logvar_is_clipped():
  post = DiagonalGaussian(jnp.concatenate([jnp.zeros((1, 2, 2, 4)), jnp.full((1, 2, 2, 4), 50.0)], -1))
  assert float(post.logvar.max()) == 20.0


def test_bf16_forward_close_to_fp32():
  """bf16 compute with fp32 params stays within 5% (relative to the output scale) of fp32."""
  cfg = load_config_file("configs/sd15.py:tiny")
  x, t, ctx = _unet_inputs()
  ctx = jax.random.normal(jax.random.key(5), (2, 5, cfg.model.unet.cross_attention_dim))
  unet32 = build_unet(cfg.model)
  params = jax.jit(unet32.init)(jax.random.key(0), x, t, ctx)
  cfg.model.dtype = "bfloat16"
  unet16 = build_unet(cfg.model)
  out32 = jax.jit(unet32.apply)(params, x, t, ctx)
  out16 = jax.jit(unet16.apply)(params, x, t, ctx)
  assert out16.dtype == jnp.bfloat16
  rel = float(jnp.max(jnp.abs(out16.astype(jnp.float32) - out32)) / jnp.max(jnp.abs(out32)))
  assert rel < 0.05, rel

  vae32 = build_vae(load_config_file("configs/sd15.py:tiny").model)
  img = jax.random.uniform(jax.random.key(1), (1, 16, 16, 3), minval=-1, maxval=1)
  vparams = jax.jit(vae32.init)(jax.random.key(0), img)
  vae16 = build_vae(cfg.model)
  rec32, _ = jax.jit(vae32.apply)(vparams, img)
  rec16, _ = jax.jit(vae16.apply)(vparams, img)
  rel = float(jnp.max(jnp.abs(rec16.astype(jnp.float32) - rec32)) / jnp.max(jnp.abs(rec32)))
  assert rel < 0.05, rel
