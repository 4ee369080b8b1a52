"""Choosing a feature network by name, and extracting features from a stream of image batches."""

from typing import Dict, Iterable, Optional

import numpy as np

from latent_diffusion_jax.core.errors import FlagError, UserInputError
from latent_diffusion_jax.evaluation.feature_nets.base import FeatureNet
from latent_diffusion_jax.evaluation.progress import Progress

FEATURE_NETS = ("inception", "shapes")


def load_feature_net(kind: str, *, inception_weights: Optional[str] = None,
                     shapes_weights: Optional[str] = None) -> FeatureNet:
  """"inception" (pytorch-fid's FID Inception, converted weights) or "shapes" (the embedded
  dataset's network)."""
  if kind == "inception":
    if not inception_weights:
      raise FlagError("--features inception needs --inception_weights: the FID Inception weights "
                      "converted from pytorch-fid's pt_inception-2015-12-05 file")
    from latent_diffusion_jax.evaluation.feature_nets.inception_weights import load
    return load(inception_weights)
  if kind == "shapes":
    from latent_diffusion_jax.evaluation.feature_nets import shapes
    return shapes.load(shapes_weights or shapes.DEFAULT_WEIGHTS)
  raise UserInputError(f"unknown feature network {kind!r}; valid: {', '.join(FEATURE_NETS)}")


def stream_features(net: FeatureNet, batches: Iterable[np.ndarray], total: int, what: str,
                    batch_size: int = 50, mesh=None) -> Dict[str, np.ndarray]:
  """net's outputs ("features", "logits" where it has them) for all images of `batches`."""
  progress = Progress(f"{what}: {net.name} features", total)
  parts: Dict[str, list] = {}
  done = 0
  for batch in batches:
    for key, value in net.extract(batch, batch_size=batch_size, mesh=mesh).items():
      parts.setdefault(key, []).append(value)
    done += len(batch)
    progress.update(done)
  if not parts:
    raise UserInputError(f"{what}: no images")
  return {k: np.concatenate(v) for k, v in parts.items()}
