"""generate() places a bundle's host parameters on the mesh once and reuses them while the
bundle, its parameter trees and the mesh stay the same (sampling/placed_params.py)."""

import dataclasses
import gc

import jax
import numpy as np
import pytest

from latent_diffusion_jax import sampling
from latent_diffusion_jax.core import parallel
from latent_diffusion_jax.sampling import placed_params
from tiny_bundles import tiny_bundle

KW = dict(num_steps=2, guidance_scale=3.0, seed=0, output_type="float")


class _Holder:
  """A stand-in bundle: anything that can be weakly referenced."""


@pytest.fixture
def meshes():
  return (parallel.create_mesh({"data": 1}, devices=jax.devices()[:1]),
          parallel.create_mesh({"data": 2}, devices=jax.devices()[:2]))


@pytest.fixture
def counted_puts(monkeypatch):
  calls = []
  real = placed_params.jax.device_put

  def put(x, *args, **kwargs):
    calls.append(x)
    return real(x, *args, **kwargs)

  monkeypatch.setattr(placed_params.jax, "device_put", put)
  return calls


def test_same_bundle_trees_and_mesh_are_placed_once(meshes, counted_puts):
  owner, trees = _Holder(), ({"w": np.arange(6.0).reshape(2, 3)}, None)
  first = placed_params.placed(owner, trees, meshes[0])
  assert placed_params.placed(owner, trees, meshes[0]) is first
  assert len(counted_puts) == 1
  assert isinstance(first[0]["w"], jax.Array)
  np.testing.assert_array_equal(first[0]["w"], trees[0]["w"])


def test_new_tree_other_mesh_or_other_bundle_place_again(meshes, counted_puts):
  owner, trees = _Holder(), ({"w": np.ones(4)},)
  first = placed_params.placed(owner, trees, meshes[0])
  new_trees = ({"w": np.full(4, 2.0)},)
  second = placed_params.placed(owner, new_trees, meshes[0])
  np.testing.assert_array_equal(second[0]["w"], new_trees[0]["w"])
  on_two = placed_params.placed(owner, new_trees, meshes[1])
  assert on_two[0]["w"].sharding.mesh.size == 2 and on_two[0]["w"].sharding.is_fully_replicated
  other = placed_params.placed(_Holder(), new_trees, meshes[1])
  assert len(counted_puts) == 4 and other is not on_two and first is not second


def test_entry_goes_with_its_bundle(meshes):
  owner = _Holder()
  placed_params.placed(owner, ({"w": np.ones(3)},), meshes[0])
  assert placed_params._entry is not None
  del owner
  gc.collect()
  assert placed_params._entry is None


def test_bundle_without_weak_references_is_placed_each_call(meshes, counted_puts):
  trees = ({"w": np.ones(2)},)
  owner = ("a", "tuple")  # tuples cannot be weakly referenced
  placed_params.placed(owner, trees, meshes[0])
  placed_params.placed(owner, trees, meshes[0])
  assert len(counted_puts) == 2


def test_generate_reuses_placement_and_sees_new_params(tmp_path, meshes, counted_puts):
  bundle = tiny_bundle(str(tmp_path))
  mesh = meshes[0]
  first = sampling.generate(bundle, ["a red circle"], mesh=mesh, **KW)
  again = sampling.generate(bundle, ["a blue square"], mesh=mesh, **KW)
  assert len(counted_puts) == 1  # the second call used the first call's device copy
  assert np.abs(first - again).max() > 1e-3  # and still saw its own prompt
  # Replacing a tree (as after training) is seen: the UNet's output bias shifts the images.
  unet = dict(bundle.unet_params)
  unet["conv_out"] = dict(unet["conv_out"], bias=np.asarray(unet["conv_out"]["bias"]) + 1.0)
  shifted = dataclasses.replace(bundle, unet_params=unet)
  moved = sampling.generate(shifted, ["a red circle"], mesh=mesh, **KW)
  assert len(counted_puts) == 2 and np.abs(moved - first).max() > 1e-3
  np.testing.assert_array_equal(sampling.generate(bundle, ["a red circle"], mesh=mesh, **KW),
                                first)
