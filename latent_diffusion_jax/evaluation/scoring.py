"""From features to the metrics an evaluation reports: FID, IS, precision/recall, CLIP score."""

import dataclasses
import functools
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

from latent_diffusion_jax.core.errors import FlagError, UserInputError
from latent_diffusion_jax.evaluation.metrics.fid import MIN_IMAGES, feature_stats, frechet_distance
from latent_diffusion_jax.evaluation.metrics.inception_score import inception_score
from latent_diffusion_jax.evaluation.metrics.precision_recall import DEFAULT_K, precision_recall

METRICS = ("fid", "is", "clip", "precision_recall")
IS_SPLITS = 10


def parse_metrics(text: str | Sequence[str]) -> Tuple[str, ...]:
  names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
  unknown = [m for m in names if m not in METRICS]
  if unknown or not names:
    raise FlagError(f"unknown metrics {unknown or names}; valid: {', '.join(METRICS)} (comma "
                    "separated)")
  return tuple(dict.fromkeys(names))


def check_count(metrics: Sequence[str], num_images: int) -> None:
  """Refuses, before any work, too few images for the asked metrics (naming the minimum)."""
  if "fid" in metrics and num_images < MIN_IMAGES:
    raise UserInputError(f"FID needs at least {MIN_IMAGES} images for a covariance, got "
                         f"{num_images} (and at least the feature width for a non-singular one; "
                         "published FIDs use 10k-50k)")
  if "precision_recall" in metrics and num_images <= DEFAULT_K:
    raise UserInputError(f"precision/recall with k={DEFAULT_K} needs more than {DEFAULT_K} images, "
                         f"got {num_images}")


def image_metrics(metrics: Sequence[str], generated: Dict[str, np.ndarray], reference) -> Dict[str, Any]:
  """FID, IS and precision/recall of generated features against a `reference.Reference`."""
  out: Dict[str, Any] = {}
  features = generated["features"]
  if "fid" in metrics:
    out["fid"] = frechet_distance(feature_stats(features), reference.stats)
  if "is" in metrics:
    if "logits" not in generated:
      raise FlagError("--metrics is needs a feature network with a classifier (inception, shapes)")
    # Ten splits as the original; fewer than 10 images per split would make each split's score
    # meaningless, so small sets are scored as one.
    splits = IS_SPLITS if len(features) >= 10 * IS_SPLITS else 1
    mean, std = inception_score(generated["logits"], splits=splits)
    out["is"] = {"mean": mean, "std": std, "splits": splits}
  if "precision_recall" in metrics:
    if reference.features is None:
      raise FlagError("--metrics precision_recall needs the reference features: give "
                      "--reference_images (a folder), not only --reference_stats")
    out.update(precision_recall(reference.features, features))
  return out


def clip_metric(clip_path: str, image_batches: Iterable[np.ndarray], captions: Sequence[str], *,
                model_name: Optional[str] = None, allow_pickle: bool = False,
                mesh=None) -> Dict[str, Any]:
  """CLIP score of image i against caption i in every convention (metrics/clip_score.py):
  {"cosine", "torchmetrics", "clipped", "count"}."""
  from latent_diffusion_jax.evaluation.metrics.clip_score import clip_score
  scorer = _clip_scorer(clip_path, model_name or None, allow_pickle)
  image_features = np.concatenate([scorer.image_features(b, mesh=mesh) for b in image_batches])
  if len(image_features) != len(captions):
    raise UserInputError(f"CLIP score: {len(image_features)} images but {len(captions)} captions")
  score = clip_score(image_features, scorer.text_features(list(captions), mesh=mesh))
  return dataclasses.asdict(score)


@functools.lru_cache(maxsize=2)
def _clip_scorer(path: str, model_name: Optional[str], allow_pickle: bool):
  """Loaded once per process: the in-training evaluation scores every `evaluation.every` steps."""
  from latent_diffusion_jax.evaluation.feature_nets.clip import load_clip
  return load_clip(path, model_name=model_name, allow_pickle=allow_pickle)


def check_clip(metrics: Sequence[str], clip_path: Optional[str], captions) -> None:
  if "clip" not in metrics:
    return
  if not clip_path:
    raise FlagError("--metrics clip needs --clip: a CLIP model (OpenAI CLIP as transformers "
                    "saves it, or OpenCLIP ViT-H-14 as open_clip saves it)")
  if captions is None:
    raise FlagError("--metrics clip needs --captions: the text each image is scored against")
