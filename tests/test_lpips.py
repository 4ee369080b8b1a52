"""LPIPS (VGG16): parity with a PyTorch reference built here from torch.nn layers, the weight
converter, and the missing-weights message."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion_jax.core.config import base_config
from latent_diffusion_jax.models import lpips as lpips_lib
from latent_diffusion_jax.interop import lpips as lpips_convert
from latent_diffusion_jax.training.stages.autoencoder import load_lpips_params

ATOL = 1e-4


def _torch_reference(seed: int = 0):
  """torchvision's vgg16().features layout plus LPIPS' heads, as PyTorch modules with random weights.

  Returns (features Sequential, list of 5 head convs, their state dicts in the published layouts).
  """
  torch = pytest.importorskip("torch")
  nn = torch.nn
  torch.manual_seed(seed)
  layers, c_in = [], 3
  for block, (n, width) in enumerate(zip((2, 2, 3, 3, 3), lpips_lib.VGG16_CHANNELS)):
    if block:
      layers.append(nn.MaxPool2d(2, 2))
    for _ in range(n):
      layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.ReLU()]
      c_in = width
  layers.append(nn.MaxPool2d(2, 2))
  features = nn.Sequential(*layers).eval()
  heads = [nn.Conv2d(w, 1, 1, bias=False) for w in lpips_lib.VGG16_CHANNELS]
  with torch.no_grad():
    for h in heads:  # LPIPS heads are non-negative
      h.weight.uniform_(0.0, 2.0 / h.weight.shape[1])
  vgg_sd = {f"features.{k}": v for k, v in features.state_dict().items()}
  vgg_sd["classifier.0.weight"] = torch.zeros(4, 2)  # dropped by the converter
  lpips_sd = {f"lin{i}.model.1.weight": h.weight.detach().clone() for i, h in enumerate(heads)}
  return features, heads, vgg_sd, lpips_sd


def _torch_lpips(features, heads, x, y):
  """LPIPS' forward written out: scaling layer, relu taps, unit-normalize, heads, spatial mean."""
  import torch
  shift = torch.tensor(lpips_lib.SHIFT).view(1, 3, 1, 1)
  scale = torch.tensor(lpips_lib.SCALE).view(1, 3, 1, 1)
  taps = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

  def feats(v):
    v, out = (v - shift) / scale, []
    for i, layer in enumerate(features):
      v = layer(v)
      if i in taps:
        out.append(v / (torch.sqrt(torch.sum(v**2, dim=1, keepdim=True)) + 1e-10))
    return out

  total = 0
  for head, a, b in zip(heads, feats(x), feats(y)):
    total = total + head((a - b) ** 2).mean(dim=(2, 3))
  return total[:, 0]


def test_lpips_matches_torch_reference_through_converter(tmp_path):
  torch = pytest.importorskip("torch")
  features, heads, vgg_sd, lpips_sd = _torch_reference()
  torch.save(vgg_sd, tmp_path / "vgg16.pth")
  torch.save(lpips_sd, tmp_path / "vgg.pth")
  out = str(tmp_path / "lpips_vgg.safetensors")
  with pytest.raises(ValueError, match="pickle"):
    lpips_convert.main(["--vgg16", str(tmp_path / "vgg16.pth"), "--lpips", str(tmp_path / "vgg.pth"),
                        "--out", out])
  lpips_convert.main(["--vgg16", str(tmp_path / "vgg16.pth"), "--lpips", str(tmp_path / "vgg.pth"),
                      "--out", out, "--allow_pickle"])
  params = lpips_lib.load_params(out)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
  y = np.clip(x + 0.3 * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
  with torch.no_grad():
    ref = _torch_lpips(features, heads, torch.from_numpy(x), torch.from_numpy(y)).numpy()
  nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
  net = lpips_lib.LPIPS()
  ours = np.asarray(jax.jit(net.apply)({"params": params}, nhwc(x), nhwc(y)))
  np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=1e-4)
  assert ref.min() > 1e-3  # a real distance, not two zeros


def test_converter_rejects_negative_heads():
  _, _, vgg_sd, lpips_sd = _torch_reference()
  lpips_sd["lin2.model.1.weight"] = -lpips_sd["lin2.model.1.weight"]
  to_np = lambda sd: {k: v.numpy() for k, v in sd.items()}
  with pytest.raises(ValueError, match="negative"):
    lpips_convert.convert(to_np(vgg_sd), to_np(lpips_sd))


def test_unit_normalize_has_finite_gradient_at_zero():
  f = lambda v: jnp.sum(lpips_lib._unit_normalize(v) * jnp.arange(3.0))
  v = jnp.zeros((1, 1, 1, 3))
  assert np.all(np.isfinite(np.asarray(jax.grad(f)(v))))
  np.testing.assert_allclose(lpips_lib._unit_normalize(jnp.array([3.0, 4.0])), [0.6, 0.8], rtol=1e-6)


def test_missing_weights_message_names_key_and_converter(tmp_path):
  c = base_config()
  c.autoencoder.perceptual_weight = 1.0
  c.autoencoder.lpips_weights = str(tmp_path / "nope.safetensors")
  with pytest.raises(FileNotFoundError) as e:
    load_lpips_params(c)
  assert "c.autoencoder.lpips_weights" in str(e.value)
  assert "python -m latent_diffusion_jax.interop.lpips" in str(e.value)
  c.autoencoder.perceptual_weight = 0.0
  assert load_lpips_params(c) is None
