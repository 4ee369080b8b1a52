"""Shared pieces of the image-conditioned evaluators (inpaint, sr and semantic fidelity): the
held-out shapes images, the run's image-conditioning settings, masked PSNR and the first stage's
reconstruction.

Held-out images are the first examples of the shapes "test" split (dataset seed 0), generated
directly (`shapes.generate_batch`, the same pure function the TFDS builder writes), so the
evaluators need neither the data directory nor TensorFlow. The test split holds only the 12
(color, shape, position) combinations the training split never shows.
"""

from typing import Any, Dict, List, Tuple

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np

from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.data import shapes
from latent_diffusion_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian
from latent_diffusion_jax.models.bundle import ModelBundle, decode_latents


def held_out_examples(num_images: int, image_size: int = 32, start: int = 0
                  ) -> Tuple[np.ndarray, List[str], List[Dict[str, Any]]]:
  """(uint8 images [N, S, S, 3], captions, attributes) of test examples start .. start + N - 1."""
  if num_images <= 0:
    raise UserInputError(f"num_images must be positive, got {num_images}.")
  return shapes.generate_batch(start, num_images, split="test", image_size=image_size)


def run_config(bundle: ModelBundle) -> mc.ConfigDict:
  """The training config a workdir bundle carries (its `image_conditioning` settings)."""
  from latent_diffusion_jax.core.config import config_from_json
  text = (bundle.metadata or {}).get("config")
  if not text:
    raise UserInputError("The model carries no training config; evaluate a training workdir of "
                         "an image-conditioned run (train.py --config configs/shapes_*_ldm.py).")
  return config_from_json(text) if isinstance(text, str) else mc.ConfigDict(text)


def require_kind(bundle: ModelBundle, kind: str, what: str) -> None:
  """Raises UserInputError unless the bundle has `kind` image conditioning."""
  have = bundle.image_conditioning.kind if bundle.image_conditioning is not None else None
  if have != kind:
    raise UserInputError(f"{what} needs a model with {kind} conditioning; "
                         f"{bundle.metadata.get('source', 'the model')} has "
                         f"{have or 'none (a text-to-image model)'}.")


def masked_psnr(x: np.ndarray, y: np.ndarray, keep: np.ndarray) -> np.ndarray:
  """Per-example PSNR in dB over the pixels where `keep` [N, H, W] is true, of uint8 images
  [N, H, W, 3] (peak 1 on [0, 1], as `image_metrics.psnr`); 100 dB for identical pixels."""
  a = np.asarray(x, np.float64) / 255.0
  b = np.asarray(y, np.float64) / 255.0
  keep = np.asarray(keep, bool)[..., None]
  count = np.maximum(keep.sum(axis=(1, 2, 3)) * a.shape[-1], 1)
  mse = (((a - b) ** 2) * keep).sum(axis=(1, 2, 3)) / count
  return -10.0 * np.log10(np.maximum(mse, 1e-10))


def reconstruct(bundle: ModelBundle, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
  """uint8 images [N, H, W, 3] through the first stage (the posterior mean for KL, the
  quantized latents for VQ) and back, uint8."""
  vae, params = bundle.vae, bundle.vae_params

  @jax.jit
  def round_trip(x):
    z = vae.apply({"params": params}, x.astype(vae.dtype), method=vae.encode)
    if isinstance(vae, AutoencoderKL):
      z = DiagonalGaussian(z.astype(jnp.float32)).mean
    return jnp.clip(decode_latents(vae, params, z).astype(jnp.float32), -1.0, 1.0)

  out = []
  for i in range(0, len(images), batch_size):
    x = jnp.asarray(images[i:i + batch_size], jnp.float32) / 127.5 - 1.0
    out.append(np.asarray(round_trip(x)))
  return np.clip(np.round((np.concatenate(out) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def summary_rows(per_example: List[Dict[str, Any]], keys: Tuple[str, ...]) -> Dict[str, float]:
  """Mean of each key over the rows (0 for no rows)."""
  n = len(per_example)
  return {k: float(sum(float(r[k]) for r in per_example) / n) if n else 0.0 for k in keys}
