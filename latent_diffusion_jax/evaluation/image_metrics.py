"""Reconstruction quality metrics on images in [-1, 1]: PSNR and SSIM, per example."""

import jax
import jax.numpy as jnp
import numpy as np
from latent_diffusion_jax.core.errors import UserInputError


def psnr(x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
  """Peak signal-to-noise ratio in dB of images [B, H, W, C] in [-1, 1] (peak 1 on [0, 1])."""
  mse = jnp.mean((jnp.clip(x, -1, 1) - jnp.clip(y, -1, 1)) ** 2 / 4.0, axis=(1, 2, 3))
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  """Normalized 1-D Gaussian of `size` taps; SSIM's 2-D window is its outer product."""
  t = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  w = np.exp(-t**2 / (2.0 * sigma**2))
  return (w / w.sum()).astype(np.float32)


def _filter(x: jnp.ndarray, window: jnp.ndarray) -> jnp.ndarray:
  """Separable 'valid' Gaussian filtering of each channel of x [B, H, W, C]."""
  c = x.shape[-1]
  k = window.shape[0]
  dn = ("NHWC", "HWIO", "NHWC")
  kh = jnp.tile(window.reshape(k, 1, 1, 1), (1, 1, 1, c))
  kw = jnp.tile(window.reshape(1, k, 1, 1), (1, 1, 1, c))
  conv = lambda v, kern: jax.lax.conv_general_dilated(
      v, kern, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c,
      precision=jax.lax.Precision.HIGHEST)
  return conv(conv(x, kh), kw)


def ssim(x: jnp.ndarray, y: jnp.ndarray, window_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> jnp.ndarray:
  """Structural similarity (Wang et al. 2004) of images [B, H, W, C] in [-1, 1], per example.

  Images are mapped to [0, 1] (data range 1, so C1 = k1^2, C2 = k2^2); local statistics use a
  Gaussian window (11 taps, sigma 1.5) over the positions where it fits entirely ('valid', like
  tf.image.ssim); the SSIM map is averaged over positions and channels.
  """
  if min(x.shape[1:3]) < window_size:
    raise UserInputError(f"SSIM needs images of at least {window_size}x{window_size}; got {x.shape}.")
  a = (jnp.clip(x.astype(jnp.float32), -1, 1) + 1.0) / 2.0
  b = (jnp.clip(y.astype(jnp.float32), -1, 1) + 1.0) / 2.0
  window = jnp.asarray(gaussian_window(window_size, sigma))
  mu_a, mu_b = _filter(a, window), _filter(b, window)
  var_a = _filter(a * a, window) - mu_a**2
  var_b = _filter(b * b, window) - mu_b**2
  cov = _filter(a * b, window) - mu_a * mu_b
  c1, c2 = k1**2, k2**2
  num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
  den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
  return jnp.mean(num / den, axis=(1, 2, 3))
