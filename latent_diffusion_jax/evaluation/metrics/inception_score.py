"""Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), mean and std over splits.

As the original code and torch-fidelity compute it: softmax of the classifier logits, the images
split into `splits` consecutive groups, the score of each group, their mean and standard deviation.
"""

from typing import Tuple

import numpy as np
from scipy.special import log_softmax

from latent_diffusion_jax.core.errors import UserInputError


def inception_score(logits: np.ndarray, splits: int = 10) -> Tuple[float, float]:
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2:
    raise UserInputError(f"logits must be [N, classes], got shape {logits.shape}")
  if splits < 1 or len(logits) < splits:
    raise UserInputError(f"Inception Score with {splits} splits needs at least {splits} images, "
                         f"got {len(logits)}")
  log_p = log_softmax(logits, axis=1)
  scores = []
  for part in np.array_split(log_p, splits):
    log_marginal = np.log(np.exp(part).mean(0))
    kl = (np.exp(part) * (part - log_marginal)).sum(1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))
