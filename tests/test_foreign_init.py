"""Fine-tuning from foreign weights: `training.init_checkpoint` naming a diffusers pipeline, a
single-file checkpoint or a native export puts exactly those weights, sharded, into a fresh state."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from latent_diffusion_jax.artifacts import loader
from latent_diffusion_jax.core import parallel
from latent_diffusion_jax.core.config import base_config
from latent_diffusion_jax.interop.export_diffusers import export_diffusers
from latent_diffusion_jax.interop.native import export_native
from latent_diffusion_jax.interop.single_file import export_single_file
from latent_diffusion_jax.training import foreign_init, startup
from latent_diffusion_jax.checkpoints.checkpointer import Checkpointer
from latent_diffusion_jax.training.diffusion_step import init_train_state
from tiny_bundles import MAX_LENGTH, assert_trees_equal, cached_bundle

MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def _init_fn(bundle, trained):
  tx = optax.adamw(1e-3)

  def init_fn(rng):
    r_unet, r_text = jax.random.split(rng)
    lat = jnp.zeros((1, 2, 2, bundle.unet.in_channels))
    ctx = jnp.zeros((1, MAX_LENGTH, bundle.unet.cross_attention_dim))
    params = {"unet": bundle.unet.init(r_unet, lat, jnp.zeros((1,), jnp.int32), ctx)["params"]}
    if "text_encoder" in trained:
      ids = jnp.zeros((1, MAX_LENGTH), jnp.int32)
      params["text_encoder"] = bundle.text_encoder.init(r_text, ids)["params"]
    return init_train_state(params, tx, 0, ema=True)

  return init_fn


def _start(bundle, source, workdir, trained):
  config = base_config()
  config.training.init_checkpoint = source
  mesh = parallel.create_mesh(MESH)
  rules = parallel.DEFAULT_LOGICAL_AXIS_RULES
  modules = {"unet": bundle.unet, "text_encoder": bundle.text_encoder}
  with parallel.mesh_context(mesh, rules):
    return startup.initial_state(config, workdir, _init_fn(bundle, trained), mesh, rules,
                               Checkpointer(workdir), {k: modules[k] for k in trained})


def _export(kind, bundle, out):
  if kind == "diffusers":
    export_diffusers(bundle, out)
    return out
  if kind == "single_file":
    path = os.path.join(out, "model.safetensors")
    os.makedirs(out)
    export_single_file(bundle, path)
    return path
  export_native(bundle, out)
  return out


@pytest.mark.parametrize("kind,bundle_kind,trained", [
    ("diffusers", "sd1", ("unet",)),
    ("single_file", "sd1", ("unet",)),
    ("native", "ldm", ("unet", "text_encoder")),
])
def test_imported_weights_become_params_and_ema_sharded(kind, bundle_kind, trained,
                                                        tmp_path, tmp_path_factory):
  bundle = cached_bundle(bundle_kind, tmp_path_factory)
  source = _export(kind, bundle, str(tmp_path / "export"))
  state, shardings, data, meta = _start(bundle, source, str(tmp_path / "work"), trained)
  assert data is None and meta is None and int(state.step) == 0
  expected = {"unet": bundle.unet_params, "text_encoder": bundle.text_encoder_params}
  for name in trained:
    assert_trees_equal(jax.device_get(state.params[name]), expected[name])
    assert_trees_equal(jax.device_get(state.ema_params[name]), expected[name])
  # Placed on the shardings the logical rules give (e.g. the UNet's conv kernels split), and
  # params and EMA are distinct buffers (the step donates the state).
  placed = jax.tree.leaves(state.params["unet"])
  for leaf, sharding in zip(placed, jax.tree.leaves(shardings.params["unet"])):
    assert leaf.sharding == sharding
  assert any(not s.is_fully_replicated for s in jax.tree.leaves(shardings.params["unet"]))
  ema_leaf = jax.tree.leaves(state.ema_params["unet"])[0]
  def pointer(x):
    return x.addressable_shards[0].data.unsafe_buffer_pointer()
  assert pointer(ema_leaf) != pointer(placed[0])
  # The optimizer state starts fresh.
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(state.opt_state[0].mu))


def test_architecture_mismatch_names_the_config_key(tmp_path_factory):
  bundle = cached_bundle("sd1", tmp_path_factory)
  ours = dataclasses.replace(bundle.unet, num_heads=2, remat=True, attention_impl="auto")
  with pytest.raises(ValueError, match=r"model\.unet\.num_heads=\(2, 2\) but the weights need \(4, 4\)"):
    foreign_init.check_same_architecture(ours, bundle.unet, "model.unet", "/src")
  # Runtime choices (remat, attention implementation, dtype) may differ; an int per-level field
  # equals the same value given per level.
  same = dataclasses.replace(bundle.unet, remat=True, attention_impl="auto", num_heads=(4, 4),
                             dtype=jnp.bfloat16)
  foreign_init.check_same_architecture(same, bundle.unet, "model.unet", "/src")


def test_unrecognised_or_incomplete_sources_are_refused(tmp_path, tmp_path_factory):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="training.init_checkpoint: .* is none of"):
    foreign_init.import_params(str(tmp_path / "empty"), {"unet": None})
  bundle = cached_bundle("sd1", tmp_path_factory)
  vae_only = str(tmp_path / "pipe")
  export_diffusers(bundle, vae_only)
  with pytest.raises(ValueError, match="holds no unet weights"):
    foreign_init.import_params(os.path.join(vae_only, "vae"), {"unet": bundle.unet})
  assert loader.pipeline_parts(vae_only, ["vae", "tokenizer"]) == {
      "vae": os.path.join(vae_only, "vae"), "tokenizer": os.path.join(vae_only, "tokenizer")}
  assert loader.pipeline_parts(str(tmp_path / "empty"), ["vae"]) == {}


def test_placement_rejects_mismatched_trees():
  mesh = parallel.create_mesh(MESH)
  abstract = {"w": jax.ShapeDtypeStruct((4, 2), jnp.float32)}
  shardings = {"w": parallel.NamedSharding(mesh, parallel.PartitionSpec("fsdp"))}
  placed = foreign_init.place({"w": np.arange(8, dtype=np.float64).reshape(4, 2)}, abstract,
                              shardings, "w")
  assert placed["w"].dtype == jnp.float32 and placed["w"].sharding == shardings["w"]
  np.testing.assert_array_equal(np.asarray(placed["w"]), np.arange(8).reshape(4, 2))
  with pytest.raises(ValueError, match="shape mismatches"):
    foreign_init.place({"w": np.zeros((2, 4))}, abstract, shardings, "w")
  with pytest.raises(ValueError, match="missing"):
    foreign_init.place({"v": np.zeros((4, 2))}, abstract, shardings, "w")


@pytest.mark.parametrize("kind", ["diffusers", "single_file", "native"])
def test_first_stage_fine_tuning_imports_the_vae(kind, tmp_path, tmp_path_factory):
  """The autoencoder trainer asks for {"vae": module}: every format supplies the VAE."""
  bundle = cached_bundle("sd1" if kind != "native" else "ldm", tmp_path_factory)
  source = _export(kind, bundle, str(tmp_path / "export"))
  for path in [source] + ([os.path.join(source, "vae")] if kind == "diffusers" else []):
    params = foreign_init.import_params(path, {"vae": bundle.vae})
    assert list(params) == ["vae"]
    assert_trees_equal(params["vae"], bundle.vae_params)
  wrong = dataclasses.replace(bundle.vae, latent_channels=8)
  with pytest.raises(ValueError, match=r"model\.vae\.latent_channels=8 but the weights need 4"):
    foreign_init.import_params(source, {"vae": wrong})
