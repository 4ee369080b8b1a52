"""Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), mean and std over splits.

As the original code (openai/improved-gan) and torch-fidelity compute it: softmax of the classifier
logits, the images cut into `splits` groups at `i * N // splits`, the score of each group, their
mean and (population) standard deviation. torch-fidelity first shuffles the images with
`np.random.RandomState(2020).permutation(N)`; pass `shuffle_seed=2020` to reproduce its numbers,
leave it None for the original code's order.
"""

from typing import Optional, Tuple

import numpy as np
from scipy.special import log_softmax

from latent_diffusion_jax.core.errors import UserInputError

# torch-fidelity's default `rng_seed` for the split shuffle.
TORCH_FIDELITY_SEED = 2020


def inception_score(logits: np.ndarray, splits: int = 10,
                    shuffle_seed: Optional[int] = None) -> Tuple[float, float]:
  """(mean, std) of the Inception Score over `splits` groups of the [N, classes] logits."""
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2:
    raise UserInputError(f"logits must be [N, classes], got shape {logits.shape}")
  n = len(logits)
  if splits < 1 or n < splits:
    raise UserInputError(f"Inception Score with {splits} splits needs at least {splits} images, "
                         f"got {n}")
  if shuffle_seed is not None:
    logits = logits[np.random.RandomState(shuffle_seed).permutation(n)]
  log_p = log_softmax(logits, axis=1)
  scores = []
  for i in range(splits):
    part = log_p[i * n // splits:(i + 1) * n // splits]
    log_marginal = np.log(np.exp(part).mean(0))
    kl = (np.exp(part) * (part - log_marginal)).sum(1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))
