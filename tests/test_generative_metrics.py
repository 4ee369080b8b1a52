"""Improved precision and recall (k = 3) on constructed feature sets with known answers."""

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.evaluation.metrics.precision_recall import knn_radii, precision_recall


def test_identical_sets_have_precision_and_recall_one():
  x = np.random.default_rng(0).normal(size=(300, 16))
  assert precision_recall(x, x.copy()) == {"precision": 1.0, "recall": 1.0}


def test_far_apart_clusters_have_precision_and_recall_zero():
  rng = np.random.default_rng(1)
  real = rng.normal(size=(200, 8))
  generated = rng.normal(size=(150, 8)) + 100.0
  assert precision_recall(real, generated) == {"precision": 0.0, "recall": 0.0}


def test_generated_half_of_the_real_manifold():
  # Real: uniform on [0, 2] x [0, 1]; generated: the real points with x < 1, so every generated
  # point is a real one (precision 1) and the generated manifold covers about half the real points
  # (plus a thin band of radius ~ the 3rd-neighbour distance past x = 1).
  real = np.random.default_rng(2).uniform(size=(4000, 2)) * [2.0, 1.0]
  generated = real[real[:, 0] < 1.0]
  result = precision_recall(real, generated)
  assert result["precision"] == 1.0
  assert result["recall"] == pytest.approx(0.5, abs=0.03)
  # And the other way round: the real manifold covers all generated points, half the real are
  # covered by it; swapping the sets swaps the two numbers.
  swapped = precision_recall(generated, real)
  assert swapped["recall"] == 1.0
  assert swapped["precision"] == pytest.approx(result["recall"], abs=1e-12)


def test_blocked_distances_equal_brute_force():
  rng = np.random.default_rng(3)
  real, generated = rng.normal(size=(97, 5)), rng.normal(size=(61, 5)) * 1.3 + 0.4
  full = cdist(real, real, "sqeuclidean")
  want_radii = np.sort(full, axis=1)[:, 3]
  np.testing.assert_allclose(knn_radii(real, 3, block=10), want_radii, rtol=1e-9, atol=1e-12)
  gen_radii = np.sort(cdist(generated, generated, "sqeuclidean"), axis=1)[:, 3]
  want_precision = np.mean((cdist(generated, real, "sqeuclidean") <= want_radii[None]).any(1))
  want_recall = np.mean((cdist(real, generated, "sqeuclidean") <= gen_radii[None]).any(1))
  got = precision_recall(real, generated, block=10)
  assert 0 < want_precision < 1 and 0 < want_recall < 1
  assert got == {"precision": pytest.approx(want_precision), "recall": pytest.approx(want_recall)}
  assert precision_recall(real, generated, block=4096) == got


@pytest.mark.parametrize("real, generated, message", [
    (np.zeros((10, 4)), np.zeros((10, 5)), "feature widths differ: 4 (real) vs 5"),
    (np.zeros((3, 4)), np.zeros((10, 4)), "more than 3 real images, got 3"),
    (np.zeros((10,)), np.zeros((10, 4)), "must be [N, D]"),
])
def test_bad_inputs_are_named(real, generated, message):
  with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(")", r"\)")
                     .replace("[", r"\[").replace("]", r"\]")):
    precision_recall(real, generated)
