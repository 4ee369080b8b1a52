"""Stage 1's held-out evaluation, run on the mesh: PSNR, SSIM, the latent scale factor and a grid.

Like big_vision's evaluators it takes the train state's params as they are sharded (FSDP may split
them over processes): one jitted computation per batch reconstructs the images, reduces the
per-image PSNR / SSIM and latent sums on device, and only those scalars (and the grid's first
images) come to the host. Held-out batches are split over the data axes; every process holds
the whole (small) held-out array and places its own slices.
"""

import math
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from latent_diffusion_jax.core import parallel, pixels
from latent_diffusion_jax.core.images import make_grid
from latent_diffusion_jax.evaluation.image_metrics import psnr, ssim
from latent_diffusion_jax.training import startup
from latent_diffusion_jax.training.autoencoder_step import reconstruct, scale_latents

GRID_IMAGES = 8
EVAL_BATCH = 64


def to_host(x: jax.Array) -> np.ndarray:
  """A (small) result on the host; arrays spread over processes are gathered first."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _place(x: np.ndarray, mesh: Mesh) -> jax.Array:
  # Every process holds the whole host array, so each device takes its rows directly; this works
  # on meshes that span processes.
  return jax.make_array_from_callback(x.shape, parallel.batch_sharding(mesh, x.ndim),
                                      lambda index: x[index])


class ReconstructionEval:
  """`evaluate(params, images) -> (summary, grid)` of an autoencoder on `mesh`.

  Args:
    vae: the autoencoder module.
    mesh: the training mesh; batches are split over its data axes.
    batch_size: images per device call (rounded up to a multiple of the data shards); a short
      last batch is padded and the padding masked out, so one shape compiles once.
  """

  def __init__(self, vae: nn.Module, mesh: Mesh, batch_size: int = EVAL_BATCH):
    self.vae, self.mesh, self.batch_size = vae, mesh, batch_size
    self.shards = math.prod(mesh.shape[a] for a in parallel.BATCH_AXES if a in mesh.shape)

    def sums(params, images, valid):
      x = pixels.to_float(images)
      recon = reconstruct(vae, params, images)
      z = scale_latents(vae, params, images).astype(jnp.float32)
      axes = tuple(range(1, z.ndim))
      w = valid.astype(jnp.float32)
      out = {"psnr": jnp.sum(psnr(recon, x) * w), "ssim": jnp.sum(ssim(recon, x) * w),
             "latent_sum": jnp.sum(jnp.sum(z, axes) * w),
             "latent_sq": jnp.sum(jnp.sum(z * z, axes) * w),
             "latent_count": jnp.sum(w) * math.prod(z.shape[1:])}
      return out, recon[:GRID_IMAGES]

    self._fn = jax.jit(sums, out_shardings=startup.replicated(mesh))

  def __call__(self, params: Any, images: np.ndarray) -> Tuple[Dict[str, float], np.ndarray]:
    """Held-out PSNR / SSIM of deterministic reconstructions and 1/std of the stage-2 latents.

    Args:
      params: the autoencoder's params, on the mesh as the train state holds them.
      images: uint8 [N, H, W, 3], the same on every process.

    Returns:
      ({"psnr", "ssim", "latent_scale_factor"}, uint8 grid of the first images over their
      reconstructions).
    """
    n = len(images)
    b = -(-min(self.batch_size, n) // self.shards) * self.shards
    sums, grid = [], None
    for start in range(0, n, b):
      rows = np.minimum(np.arange(start, start + b), n - 1)  # padding repeats the last image
      valid = np.arange(start, start + b) < n
      out, recon = self._fn(params, _place(images[rows], self.mesh), _place(valid, self.mesh))
      sums.append(out)  # read after the loop, so the device never waits for the host
      if grid is None:
        originals = images[:min(GRID_IMAGES, n)]
        grid = _grid(originals, to_host(recon)[:len(originals)])
    totals = {k: sum(float(to_host(out[k])) for out in sums) for k in sums[0]}
    mean = totals["latent_sum"] / totals["latent_count"]
    var = totals["latent_sq"] / totals["latent_count"] - mean**2
    summary = {"psnr": totals["psnr"] / n, "ssim": totals["ssim"] / n,
               "latent_scale_factor": float(1.0 / math.sqrt(var))}
    return summary, grid


def _grid(originals: np.ndarray, recon: np.ndarray) -> np.ndarray:
  orig = originals if originals.dtype == np.uint8 else pixels.to_uint8(originals)
  return make_grid(np.concatenate([orig, pixels.to_uint8(recon)]), ncols=len(orig))


def eval_params(state) -> Any:
  """The autoencoder params evaluations use: EMA when the run keeps it, else the raw ones."""
  return (state.ema_params if state.ema_params is not None else state.params)["vae"]


class ReconstructionHook:
  """hook(step, state): every `every` steps logs held-out PSNR / SSIM and a reconstruction grid."""

  def __init__(self, every: int, writer, evaluate: ReconstructionEval, images: np.ndarray):
    self.every, self.writer, self.evaluate, self.images = every, writer, evaluate, images

  def __call__(self, step: int, state) -> None:
    if self.every <= 0 or step % self.every:
      return
    summary, grid = self.evaluate(eval_params(state), self.images)
    logging.info("Step %d: held-out PSNR %.2f dB, SSIM %.4f", step, summary["psnr"], summary["ssim"])
    self.writer.write_scalars(step, {"eval/psnr": summary["psnr"], "eval/ssim": summary["ssim"]})
    self.writer.write_images(step, {"reconstructions": grid[None]})
