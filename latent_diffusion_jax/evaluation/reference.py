"""The reference side of FID and precision/recall: statistics from a file, or from a folder of
images, cached in the output directory so a rerun (or a resumed run) does not extract them again.

The cache is `<out>/reference_<net>_<key>.npz` with `mu`, `sigma` (the pytorch-fid / clean-fid
layout, so the file serves as --reference_stats elsewhere), `count` and the features themselves
(precision/recall needs them); `key` hashes the network's weights file and the images' names,
sizes and modification times.
"""

import dataclasses
import hashlib
import os
from typing import Optional

import numpy as np
from absl import logging

from latent_diffusion_jax.core.errors import FlagError, UserInputError
from latent_diffusion_jax.evaluation import image_folder
from latent_diffusion_jax.evaluation.feature_nets.base import FeatureNet
from latent_diffusion_jax.evaluation.features import stream_features
from latent_diffusion_jax.evaluation.metrics.fid import FeatureStats, feature_stats, load_stats


@dataclasses.dataclass
class Reference:
  stats: FeatureStats
  features: Optional[np.ndarray]  # None for statistics read from a file
  origin: str


def _file_key(path: str) -> str:
  st = os.stat(path)
  return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


def cache_path(out_dir: str, net: FeatureNet, paths, weights_path: Optional[str]) -> str:
  digest = hashlib.sha256()
  digest.update(f"{net.name}:{net.dim}\n".encode())
  if weights_path and os.path.exists(weights_path):
    digest.update(_file_key(weights_path).encode())
  for path in paths:
    digest.update((_file_key(path) + "\n").encode())
  return os.path.join(out_dir, f"reference_{net.name}_{digest.hexdigest()[:12]}.npz")


def check_width(stats: FeatureStats, net: FeatureNet, origin: str) -> None:
  if stats.dim != net.dim:
    raise UserInputError(
        f"feature widths differ: {origin} holds {stats.dim}-d statistics but the {net.name} "
        f"network gives {net.dim}-d features (statistics of another feature network?)")


def load_reference(net: FeatureNet, *, out_dir: str, reference_images: Optional[str] = None,
                   reference_stats: Optional[str] = None, weights_path: Optional[str] = None,
                   batch_size: int = 50, read_batch: int = 256) -> Reference:
  """The reference statistics (and features, from images) for `net`."""
  if bool(reference_images) == bool(reference_stats):
    raise FlagError("give the reference with exactly one of --reference_images (a folder of "
                    "images) or --reference_stats (a .npz of mu and sigma)")
  if reference_stats:
    stats = load_stats(reference_stats)
    check_width(stats, net, reference_stats)
    return Reference(stats, None, reference_stats)
  paths = image_folder.list_images(reference_images, "reference_images")
  cache = cache_path(out_dir, net, paths, weights_path)
  if os.path.exists(cache):
    with np.load(cache) as f:
      features = f["features"]
    logging.info("Reference features of %d images from the cache %s", len(features), cache)
  else:
    features = stream_features(net, image_folder.iter_batches(paths, read_batch), len(paths),
                               "reference", batch_size)["features"]
    os.makedirs(out_dir, exist_ok=True)
    stats = feature_stats(features)
    tmp = cache + ".tmp.npz"
    np.savez(tmp, mu=stats.mu, sigma=stats.sigma, count=np.int64(stats.count), features=features)
    os.replace(tmp, cache)
  return Reference(feature_stats(features), features, reference_images)
