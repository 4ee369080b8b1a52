"""Our UNet and autoencoder compute what diffusers' PyTorch modules compute, on random weights.

Tolerance: max abs error <= 1e-4 in float32 (both sides fp32, matmul precision "highest").
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from latent_diffusion_jax.interop.convert import WeightImportError, flax_to_torch  # noqa: E402
from latent_diffusion_jax.interop.diffusers import load_unet, load_vae  # noqa: E402
from latent_diffusion_jax.interop.files import PickleRefusedError, load_state_dict  # noqa: E402
from latent_diffusion_jax.models.autoencoder import DiagonalGaussian  # noqa: E402
from torch_reference import randomize  # noqa: E402

ATOL = 1e-4

SD1_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
    attention_head_dim=4, norm_num_groups=8)
SD2_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(64, 128, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=[1, 2, 2], use_linear_projection=True,
    upcast_attention=True, transformer_layers_per_block=2, norm_num_groups=16, num_class_embeds=5)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def unet_pair(request, tmp_path_factory):
  cfg = SD1_UNET if request.param == "sd1" else SD2_UNET
  torch_unet = randomize(diffusers.UNet2DConditionModel(**cfg), seed=0)
  path = tmp_path_factory.mktemp(f"unet_{request.param}")
  torch_unet.save_pretrained(path, safe_serialization=True)
  unet, params, _ = load_unet(str(path))
  return request.param, torch_unet, unet, params, cfg


@pytest.mark.parity
def test_unet_matches_diffusers(unet_pair):
  _check_unet_matches(*unet_pair)


@pytest.mark.parity
def test_unet_with_chunked_attention_matches_diffusers(unet_pair, monkeypatch):
  """"chunked" attention (the CPU default of "auto"), with blocks small enough that every
  self-attention runs over several query blocks."""
  from latent_diffusion_jax.models import attention
  monkeypatch.setattr(attention, "LOGITS_BLOCK_BYTES", 16 * 1024)
  name, torch_unet, unet, params, cfg = unet_pair
  _check_unet_matches(name, torch_unet, unet.clone(attention_impl="chunked"), params, cfg)


def _check_unet_matches(name, torch_unet, unet, params, cfg):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
  t = np.array([10, 999], np.int64)
  ctx = rng.standard_normal((2, 7, cfg["cross_attention_dim"])).astype(np.float32)
  labels = np.array([1, 4]) if cfg.get("num_class_embeds") else None
  with torch.no_grad():
    ref = torch_unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                     class_labels=None if labels is None else torch.from_numpy(labels)).sample.numpy()
  extra = () if labels is None else (jnp.asarray(labels),)
  out = jax.jit(unet.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                            jnp.asarray(ctx), *extra)
  err = np.max(np.abs(np.asarray(out).transpose(0, 3, 1, 2) - ref))
  assert err <= ATOL, f"{name}: max abs error {err}"
  assert np.abs(ref).max() > 0.1  # the comparison is not between two near-zero tensors


@pytest.mark.parity
def test_unet_params_round_trip_to_torch_keys(unet_pair):
  _, torch_unet, _, params, _ = unet_pair
  ours = flax_to_torch(params)
  theirs = {k: v.numpy() for k, v in torch_unet.state_dict().items()}
  assert set(ours) == set(theirs)
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)


@pytest.fixture(scope="module", params=[(32, 64), (16, 32, 32)], ids=["f2", "f4"])
def vae_pair(request, tmp_path_factory):
  chans = request.param
  torch_vae = randomize(diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, block_out_channels=chans, layers_per_block=1,
      down_block_types=("DownEncoderBlock2D",) * len(chans),
      up_block_types=("UpDecoderBlock2D",) * len(chans), latent_channels=4, norm_num_groups=8,
      sample_size=16), seed=2)
  path = tmp_path_factory.mktemp("vae")
  torch_vae.save_pretrained(path, safe_serialization=True)
  vae, params, cfg = load_vae(str(path))
  return torch_vae, vae, params


@pytest.mark.parity
def test_vae_encoder_and_decoder_match_diffusers(vae_pair):
  torch_vae, vae, params = vae_pair
  x = np.random.default_rng(3).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():
    dist = torch_vae.encode(torch.from_numpy(x)).latent_dist
    ref_mean, ref_logvar = dist.mean.numpy(), dist.logvar.numpy()
    z = dist.mean
    ref_dec = torch_vae.decode(z).sample.numpy()
  moments = vae.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), method=vae.encode)
  post = DiagonalGaussian(moments)
  np.testing.assert_allclose(np.asarray(post.mean).transpose(0, 3, 1, 2), ref_mean, atol=ATOL, rtol=0)
  np.testing.assert_allclose(np.asarray(post.logvar).transpose(0, 3, 1, 2), ref_logvar, atol=ATOL, rtol=0)
  dec = vae.apply({"params": params}, jnp.asarray(z.numpy().transpose(0, 2, 3, 1)), method=vae.decode)
  np.testing.assert_allclose(np.asarray(dec).transpose(0, 3, 1, 2), ref_dec, atol=ATOL, rtol=0)
  with torch.no_grad():
    ref_kl = dist.kl().numpy()
  np.testing.assert_allclose(np.asarray(post.kl()), ref_kl, rtol=1e-4)


def test_import_names_missing_unexpected_and_mismatched_keys(unet_pair, tmp_path):
  from safetensors.numpy import save_file
  _, torch_unet, _, _, cfg = unet_pair
  sd = {k: v.numpy() for k, v in torch_unet.state_dict().items()}
  sd.pop("conv_in.bias")
  sd["bogus.layer.weight"] = np.zeros((2, 2), np.float32)
  sd["conv_out.weight"] = np.zeros((1, 1, 3, 3), np.float32)
  torch_unet.save_config(tmp_path)
  save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  with pytest.raises(WeightImportError) as e:
    load_unet(str(tmp_path))
  msg = str(e.value)
  assert "conv_in/bias" in msg and "bogus.layer.weight" in msg and "conv_out.weight" in msg


def test_pickle_refused_without_flag(tmp_path):
  torch.save({"w": torch.zeros(2)}, tmp_path / "diffusion_pytorch_model.bin")
  with pytest.raises(PickleRefusedError, match="arbitrary code"):
    load_state_dict(str(tmp_path))
  assert set(load_state_dict(str(tmp_path), allow_pickle=True)) == {"w"}
