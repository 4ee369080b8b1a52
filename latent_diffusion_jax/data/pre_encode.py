"""Encodes an in-memory image set once with the frozen VAE, so training steps read latents.

What is stored depends on the first stage: a KL model's posterior moments (mean, logvar), from
which each step samples; a VQ model's pre-quantization latents, which are deterministic. They are
cached in the workdir as float16 under a fingerprint of the VAE params and the images, so a
restart or a second run with the same first stage skips the work.
"""

import hashlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion_jax.core import pixels
from latent_diffusion_jax.models.vq import VQModel
from absl import logging


def fingerprint(*trees) -> str:
  """A short hash of array trees' bytes (identifies a VAE + dataset combination)."""
  h = hashlib.sha1()
  for tree in trees:
    for leaf in jax.tree.leaves(tree):
      h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()[:16]


def batch_field(vae) -> str:
  """The batch key of what `encode_images` returns for `vae`: "latents" for a VQ model
  (deterministic pre-quantization latents), "moments" for a KL model. `encode_latents`
  (training/diffusion_step.py) also reads a VQ model's latents under "moments"."""
  return "latents" if isinstance(vae, VQModel) else "moments"


def encode_images(vae, vae_params, images: np.ndarray, *, batch_size: int = 256,
                  cache_dir: str | None = None) -> np.ndarray:
  """float16 encodings of uint8 images [N, H, W, 3]: KL posterior moments [N, h, w, 2C], or a VQ
  model's pre-quantization latents [N, h, w, embed_dim] (`batch_field` names them)."""
  path = None
  if cache_dir:
    name = batch_field(vae)
    path = os.path.join(cache_dir, f"{name}_{fingerprint(vae_params, images[:64])}_{len(images)}.npy")
    if os.path.isfile(path):
      logging.info("Using cached latents %s", path)
      return np.load(path)
  encode = jax.jit(lambda p, x: vae.apply({"params": p}, pixels.to_float(x),
                                          method=vae.encode).astype(jnp.float16))
  t0, out = time.perf_counter(), []
  for i in range(0, len(images), batch_size):
    chunk = images[i:i + batch_size]
    pad = batch_size - len(chunk)
    if pad:  # one compiled shape for every chunk
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    out.append(np.asarray(encode(vae_params, chunk))[:batch_size - pad])
    if (i // batch_size) % 20 == 0:
      logging.info("Encoding latents: %d/%d images", i + len(chunk) - pad, len(images))
  moments = np.concatenate(out)
  logging.info("Encoded %d images in %.1fs (%.0f images/s)", len(images), time.perf_counter() - t0,
               len(images) / (time.perf_counter() - t0))
  if path:
    os.makedirs(cache_dir, exist_ok=True)
    # A private temporary name: processes sharing the workdir write the same cache at once.
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    np.save(tmp, moments)
    os.replace(tmp, path)
  return moments
