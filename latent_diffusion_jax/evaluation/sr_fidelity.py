"""Super-resolution fidelity on the held-out shapes: the model's upsampling against bicubic's.

Held-out test images (shapes "test" split) are degraded as the run was trained (its
`model.image_conditioning.degradation` and low-res factor, data/degradation.py), upscaled by the
model at a given noise level with their captions as prompts, and compared with the ground truth:

  psnr, ssim                 of the model's images against the ground truth (evaluation/
                             image_metrics.py), beside
  psnr_bicubic, ssim_bicubic the same for bicubic upsampling of the same low-res images; the
                             issue's bar: the model above bicubic on both
  detector_agreement         `caption_fidelity.detect` reads the same color, shape and position
                             from the upscaled image as from the ground truth (bar >= 95%), with
                             `detector_agreement_bicubic` for contrast
"""

import json
import os
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.data import degradation, image_conditioning_data
from latent_diffusion_jax.evaluation import held_out_images, image_metrics
from latent_diffusion_jax.evaluation.caption_fidelity import ATTRIBUTES, detect


def bicubic_upsample(low_res: np.ndarray, size: int) -> np.ndarray:
  """uint8 [N, h, w, 3] -> uint8 [N, size, size, 3] by bicubic interpolation."""
  low = jnp.asarray(low_res, jnp.float32)
  up = jax.image.resize(low, (low.shape[0], size, size, low.shape[-1]), "bicubic")
  return np.clip(np.round(np.asarray(up)), 0, 255).astype(np.uint8)


def _metrics(images: np.ndarray, truth: np.ndarray) -> tuple:
  x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  y = jnp.asarray(truth, jnp.float32) / 127.5 - 1.0
  return np.asarray(image_metrics.psnr(x, y)), np.asarray(image_metrics.ssim(x, y))


def _agreement(images: np.ndarray, truth: np.ndarray) -> np.ndarray:
  return np.asarray([all(a[k] == b[k] for k in ATTRIBUTES) and a["color"] != "none"
                     for a, b in ((detect(i), detect(t)) for i, t in zip(images, truth))])


def sr_scores(upscaled: np.ndarray, truth: np.ndarray, bicubic: np.ndarray) -> Dict[str, Any]:
  """Scores upscaled uint8 images [N, S, S, 3] against the ground truth, beside bicubic.

  Returns:
    mean "psnr", "ssim", "psnr_bicubic", "ssim_bicubic", "detector_agreement",
    "detector_agreement_bicubic", "beats_bicubic" (psnr and ssim both above bicubic's),
    "num_examples" and "per_example" rows (psnr, ssim, agreement).
  """
  if not len(upscaled) == len(truth) == len(bicubic):
    raise UserInputError(f"sr_scores needs as many ground-truth and bicubic images as upscaled "
                         f"ones ({len(upscaled)}).")
  psnr, ssim = _metrics(upscaled, truth)
  psnr_b, ssim_b = _metrics(bicubic, truth)
  agree, agree_b = _agreement(upscaled, truth), _agreement(bicubic, truth)
  scores = {"psnr": float(psnr.mean()), "ssim": float(ssim.mean()),
            "psnr_bicubic": float(psnr_b.mean()), "ssim_bicubic": float(ssim_b.mean()),
            "detector_agreement": float(agree.mean()),
            "detector_agreement_bicubic": float(agree_b.mean())}
  scores["beats_bicubic"] = bool(scores["psnr"] > scores["psnr_bicubic"]
                                 and scores["ssim"] > scores["ssim_bicubic"])
  rows = [{"psnr": float(p), "ssim": float(s), "agreement": bool(a)}
          for p, s, a in zip(psnr, ssim, agree)]
  return {**scores, "num_examples": len(upscaled), "per_example": rows}


def evaluate(bundle, *, num_images: int = 96, noise_level: int = 20, seed: int = 1234,
             num_steps: int = 50, guidance_scale: float = 3.0, sampler: str = "ddim",
             batch_size: int = 64, out_dir: Optional[str] = None, progress=None
             ) -> Dict[str, Any]:
  """Upscales held-out test images degraded as the run was trained and scores them; writes
  images and scores (sr_fidelity.json) to `out_dir` when given."""
  from latent_diffusion_jax.sampling.image_conditioned import upscale
  held_out_images.require_kind(bundle, "upscaling", "Super-resolution fidelity")
  config = held_out_images.run_config(bundle)
  factor = image_conditioning_data.low_res_factor(config)
  method = config.model.image_conditioning.degradation
  size = bundle.image_size
  truth, captions, _ = held_out_images.held_out_examples(num_images, size)
  low_res = degradation.degrade(truth, factor, method)
  t0 = time.perf_counter()
  upscaled = upscale(bundle, captions, low_res, noise_level=int(noise_level), seed=seed,
                     num_steps=num_steps, guidance_scale=guidance_scale, sampler=sampler,
                     batch_size=min(batch_size, num_images), progress_fn=progress)
  seconds = time.perf_counter() - t0
  scores = sr_scores(upscaled, truth, bicubic_upsample(low_res, size))
  per_example = scores.pop("per_example")
  scores.update(task="sr", degradation=method, factor=factor,
                low_res_size=int(low_res.shape[1]), noise_level=int(noise_level),
                seconds=seconds, seed=seed, num_steps=num_steps, guidance_scale=guidance_scale,
                sampler=sampler)
  if out_dir:
    from latent_diffusion_jax.core.images import save_images
    os.makedirs(out_dir, exist_ok=True)
    save_images(upscaled, out_dir, captions, dict(scores))
    with open(os.path.join(out_dir, "sr_fidelity.json"), "w") as f:
      json.dump({**scores, "per_example": per_example}, f, indent=1, default=str)
  return scores
