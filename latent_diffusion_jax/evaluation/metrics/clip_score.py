"""CLIP score: how well each image matches its caption, by the cosine of their CLIP embeddings.

Per pair i, cos_i = <u_i, v_i> with u_i, v_i the L2-normalized image and caption embeddings. The
conventions in use differ only in how the cosines are summarized:
  * `cosine`: mean of cos_i, as MLPerf's Stable Diffusion benchmark reports it (threshold 0.15 with
    OpenCLIP ViT-H-14).
  * `torchmetrics`: max(100 * mean(cos_i), 0), what torchmetrics' `CLIPScore` computes (its update
    sums 100 * cos_i, its compute clamps the mean at zero).
  * `clipped`: mean of 100 * max(cos_i, 0), the per-pair clamp that torchmetrics' docstring and
    Hessel et al. 2021 (CLIP-S, there with weight 2.5) write down. It equals `torchmetrics` whenever
    no pair has a negative cosine, which is the usual case for real captions.
"""

import dataclasses

import numpy as np

from latent_diffusion_jax.core.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class ClipScore:
  cosine: float
  torchmetrics: float
  clipped: float
  count: int

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _normalized(features: np.ndarray, name: str) -> np.ndarray:
  norms = np.linalg.norm(features, axis=-1, keepdims=True)
  if not np.all(norms > 0) or not np.all(np.isfinite(norms)):
    raise UserInputError(f"{name}: every feature vector must be finite and non-zero")
  return features / norms


def pair_cosines(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
  """[N] cosine of each (image, caption) pair of [N, D] embeddings (any scale)."""
  image_features = np.asarray(image_features, np.float64)
  text_features = np.asarray(text_features, np.float64)
  if image_features.ndim != 2 or text_features.ndim != 2:
    raise UserInputError(f"CLIP features must be [N, D]; got image {image_features.shape} and text "
                         f"{text_features.shape}")
  if image_features.shape != text_features.shape:
    raise UserInputError(
        f"image and text features differ in shape: {image_features.shape} vs {text_features.shape} "
        "(one caption per image, from the same CLIP model)")
  if len(image_features) == 0:
    raise UserInputError("CLIP score needs at least one (image, caption) pair")
  u = _normalized(image_features, "image features")
  v = _normalized(text_features, "text features")
  return np.sum(u * v, axis=-1)


def clip_score(image_features: np.ndarray, text_features: np.ndarray) -> ClipScore:
  """The CLIP score of paired embeddings in every convention (see the module docstring)."""
  cos = pair_cosines(image_features, text_features)
  return ClipScore(cosine=float(cos.mean()), torchmetrics=float(max(100.0 * cos.mean(), 0.0)),
                   clipped=float(np.mean(100.0 * np.maximum(cos, 0.0))), count=int(len(cos)))
