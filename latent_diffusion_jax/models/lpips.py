"""LPIPS perceptual distance (Zhang et al. 2018), VGG16 variant, as the LDM first-stage loss uses it.

d(x, y) = sum over 5 VGG16 layers l of mean over pixels of w_l . (f_l(x) - f_l(y))^2, where f_l are
the relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 activations normalized to unit L2 norm over
channels and w_l >= 0 are the learned 1x1 "lin" heads. Inputs are images in [-1, 1], shifted and
scaled by LPIPS' constants first.

Param tree: `features_<i>` are the convs at torchvision's `vgg16().features[i]` indices and
`lin_<l>` the heads, so torchvision and LPIPS state dicts map onto it mechanically. The weights
come from a local file written by `python -m latent_diffusion_jax.interop.lpips`.
"""

import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion_jax.models import layers
from latent_diffusion_jax.core.errors import UserInputError, MissingInputError

Dtype = Any

# LPIPS' ScalingLayer: per-channel shift and scale applied to [-1, 1] inputs.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# torchvision vgg16().features: convs per block; a 2x2 max pool separates blocks.
_BLOCK_CONVS = (2, 2, 3, 3, 3)
VGG16_CHANNELS = (64, 128, 256, 512, 512)
CONVERT_COMMAND = ("python -m latent_diffusion_jax.interop.lpips --vgg16 vgg16-397923af.pth "
                   "--lpips vgg.pth --out lpips_vgg.safetensors --allow_pickle")


def vgg16_conv_indices() -> Sequence[int]:
  """Indices of the convs in torchvision's `vgg16().features` (ReLU after each, pools between)."""
  out, i = [], 0
  for n in _BLOCK_CONVS:
    for _ in range(n):
      out.append(i)
      i += 2  # conv, relu
    i += 1  # max pool
  return out


def _unit_normalize(x: jnp.ndarray, eps: float = 1e-10) -> jnp.ndarray:
  """x / (||x||_channels + eps) with a finite gradient where a feature vector is all zeros."""
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return x / (norm + eps)


class LPIPS(nn.Module):
  """Perceptual distance between two image batches [B, H, W, 3] in [-1, 1] -> [B].

  Attributes:
    channels: VGG16 block widths; smaller values build tiny same-structure nets for tests.
  """
  channels: Sequence[int] = VGG16_CHANNELS
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b = x.shape[0]
    # One trunk pass over both batches: the same weights, and one set of layer calls.
    h = jnp.concatenate([x, y], axis=0).astype(jnp.float32)
    h = ((h - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)).astype(self.dtype)
    indices = iter(vgg16_conv_indices())
    total = jnp.zeros((b,), jnp.float32)
    for block, (n, width) in enumerate(zip(_BLOCK_CONVS, self.channels)):
      if block > 0:
        h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")
      for _ in range(n):
        h = nn.relu(layers.conv(width, name=f"features_{next(indices)}", **kw)(h))
      f = _unit_normalize(h.astype(jnp.float32))
      diff = (f[:b] - f[b:]) ** 2
      # LPIPS' head is dropout + bias-free 1x1 conv; dropout is off in eval mode, as losses use it,
      # and a bias-free 1x1 conv is a Dense over channels.
      head = layers.dense(1, ("embed", "mlp"), use_bias=False, dtype=jnp.float32,
                          param_dtype=self.param_dtype, name=f"lin_{block}")
      total = total + jnp.mean(head(diff), axis=(1, 2, 3))
    return total


def abstract_params(lpips: LPIPS) -> Any:
  """Param shapes of `lpips` (nothing allocated)."""
  x = jnp.zeros((1, 16, 16, 3))
  return nn.meta.unbox(jax.eval_shape(lambda: lpips.init(jax.random.key(0), x, x))["params"])


def missing_weights_message(path: str = "", config_key: str = "c.autoencoder.lpips_weights") -> str:
  """Why a run with a perceptual loss cannot start without LPIPS weights, and how to make them."""
  where = f"{config_key}={path!r} does not exist" if path else f"{config_key} is not set"
  return (f"autoencoder.perceptual_weight > 0 needs LPIPS weights, but {where}. Nothing is "
          "downloaded at run time: get torchvision's VGG16 ImageNet weights (vgg16-397923af.pth) "
          "and the LPIPS v0.1 VGG heads (lpips/weights/v0.1/vgg.pth), convert them once with\n"
          f"  {CONVERT_COMMAND}\nand pass --config.autoencoder.lpips_weights=lpips_vgg.safetensors, "
          "or set --config.autoencoder.perceptual_weight=0.")


def load_params(path: str, lpips: LPIPS | None = None) -> Any:
  """Reads the converter's safetensors file into the param tree of `lpips` (default: VGG16 widths).

  Raises:
    FileNotFoundError: no file at `path` (the message says how to make one).
    ValueError: the file does not hold exactly this network's params.
  """
  from flax import traverse_util
  from safetensors.numpy import load_file
  if not path or not os.path.isfile(path):
    raise MissingInputError(missing_weights_message(path))
  flat = {tuple(k.split("/")): v for k, v in load_file(path).items()}
  reference = traverse_util.flatten_dict(abstract_params(lpips or LPIPS()))
  problems = sorted("/".join(k) for k in set(reference) ^ set(flat))
  problems += [f"{'/'.join(k)}: file {flat[k].shape} vs model {reference[k].shape}"
               for k in reference if k in flat and tuple(flat[k].shape) != tuple(reference[k].shape)]
  if problems:
    raise UserInputError(f"{path} does not hold the LPIPS params of this network: {problems[:10]}")
  return traverse_util.unflatten_dict({k: np.asarray(v, np.float32) for k, v in flat.items()})
