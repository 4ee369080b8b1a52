"""The one loader (artifacts/loader.py): every kind of source is detected, loads the same model,
reads only the networks asked for, and reads a training workdir's params without its optimizer
state.

Sources: the tiny "sd1" bundle of tiny_bundles.py written by our three exporters (diffusers
pipeline, single file, native) plus a diffusers VQModel directory; workdirs: one 2-step run of
each stage (configs/shapes_autoencoder.py:tiny, configs/shapes_ldm.py:tiny, both shrunk further),
trained once for this module (about a minute on 2 cores).
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from latent_diffusion_jax.artifacts import loader
from latent_diffusion_jax.artifacts import workdir as workdir_lib
from latent_diffusion_jax.artifacts.loader import Source, detect_kind, load_bundle, load_networks
from latent_diffusion_jax.checkpoints.checkpointer import Checkpointer, CheckpointRestoreError
from latent_diffusion_jax.core.errors import MissingInputError, UserError, UserInputError
from latent_diffusion_jax.interop.export_diffusers import export_diffusers
from latent_diffusion_jax.interop.native import export_native
from latent_diffusion_jax.interop.single_file import export_single_file
from tiny_bundles import _init, assert_trees_equal, cached_bundle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------ sources


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
  return cached_bundle("sd1", tmp_path_factory)


@pytest.fixture(scope="module")
def sources(sd1, tmp_path_factory):
  """The same model as a diffusers pipeline, a single file and a native export; plus a diffusers
  VQModel directory."""
  base = tmp_path_factory.mktemp("sources")
  paths = {"diffusers": str(base / "pipeline"), "single_file": str(base / "sd1.safetensors"),
           "native": str(base / "native"), "vq": str(base / "vq")}
  export_diffusers(sd1, paths["diffusers"])
  export_single_file(sd1, paths["single_file"])
  export_native(sd1, paths["native"])
  from latent_diffusion_jax.interop.diffusers_vq import export_vq_model
  from latent_diffusion_jax.models.vq import VQModel
  import jax.numpy as jnp
  vq = VQModel(block_out_channels=(8, 16), layers_per_block=1, latent_channels=3,
               num_vq_embeddings=8, norm_num_groups=4, mid_block_attention=False)
  export_vq_model(vq, _init(vq, jnp.zeros((1, 8, 8, 3)), seed=3), paths["vq"], sample_size=16,
                  scaling_factor=0.25)
  return paths


def _shrink_first_stage(c):
  c.model.image_size = 16
  c.model.vae.block_out_channels = (8, 16)
  c.model.vae.norm_num_groups = 4
  c.model.vae.mid_block_attention = False


@pytest.fixture(scope="session")
def workdirs(tmp_path_factory):
  """(stage-1 workdir, stage-2 workdir): 2 steps each of the embedded default's :tiny configs with
  smaller networks, checkpoints at steps 1 and 2; stage 2 keeps EMA params (decay 0.99, warmed up)
  and trains its text transformer."""
  from latent_diffusion_jax.core.config import load_config_file
  from latent_diffusion_jax.training.run import run_training
  base = tmp_path_factory.mktemp("workdirs")
  ae, ldm, data = str(base / "ae"), str(base / "ldm"), str(base / "tfds")
  c = load_config_file(os.path.join(REPO, "configs", "shapes_autoencoder.py:tiny"))
  _shrink_first_stage(c)
  c.autoencoder.disc_channels, c.autoencoder.disc_num_layers = 8, 1
  c.data.data_dir, c.training.async_checkpointing = data, False
  run_training(c, ae)
  c = load_config_file(os.path.join(REPO, "configs", "shapes_ldm.py:tiny"))
  _shrink_first_stage(c)
  u = c.model.unet
  u.block_out_channels, u.attention_levels, u.norm_num_groups = (16,), (True,), 8
  u.mid_block_attention, u.cross_attention_dim = False, 16
  t = c.model.text_encoder.ldm
  t.width, t.depth, t.heads, t.head_dim = 16, 1, 2, 8
  c.training.sample_every = 0
  c.data.data_dir, c.training.async_checkpointing, c.frozen.vae = data, False, ae
  run_training(c, ldm)
  return ae, ldm


def _full_state(workdir, step=None):
  """The whole train state of a step as saved (params, opt_state, ema_params, ...), on the host."""
  with Checkpointer(workdir, read_only=True) as ckpt:
    state, _, _ = ckpt.restore(step)
  return jax.device_get(state)


def _differs(a, b) -> bool:
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---------------------------------------------------------------------------- detect_kind


def test_detect_kind_names_every_kind(sources, workdirs, monkeypatch):
  ae, ldm = workdirs
  pipeline = sources["diffusers"]
  expected = {
      ae: "workdir", ldm: "workdir",
      pipeline: "diffusers",
      os.path.join(pipeline, "unet"): "diffusers_model",
      os.path.join(pipeline, "vae"): "diffusers_model",
      sources["vq"]: "diffusers_model",
      os.path.join(pipeline, "text_encoder"): "transformers",
      sources["single_file"]: "single_file",
      sources["native"]: "native",
  }
  assert {path: detect_kind(path) for path in expected} == expected
  # The two stages are told apart by what their checkpoints record.
  assert workdir_lib.run_kind(ae) == workdir_lib.AUTOENCODER_KIND
  assert workdir_lib.run_kind(ldm) == workdir_lib.DIFFUSION_KIND
  # A relative workdir resolves against the cwd, as on the command line.
  monkeypatch.chdir(os.path.dirname(ldm))
  assert detect_kind(os.path.basename(ldm)) == "workdir"
  assert Source(os.path.basename(ldm)).resolved().kind == "workdir"


def test_detect_kind_errors_name_the_path_and_what_is_accepted(tmp_path):
  missing = str(tmp_path / "no_such_model")
  with pytest.raises(MissingInputError, match="no_such_model") as info:
    detect_kind(missing)
  assert missing in str(info.value) and isinstance(info.value, FileNotFoundError)
  unknown_config = tmp_path / "other"
  unknown_config.mkdir()
  (unknown_config / "config.json").write_text(json.dumps({"_class_name": "UNet3DConditionModel"}))
  for path in (str(tmp_path / "empty"), str(unknown_config)):
    os.makedirs(path, exist_ok=True)
    with pytest.raises(UserInputError) as info:
      detect_kind(path)
    message = str(info.value)
    assert path in message
    for accepted in ("training workdir", "diffusers pipeline", "UNet2DConditionModel",
                     "AutoencoderKL", "VQModel", "CLIPTextModel", "single-file", "native"):
      assert accepted in message, (accepted, message)
  # The same through Source and load_bundle, still in the UserError family the CLIs catch.
  with pytest.raises(MissingInputError, match="no_such_model"):
    load_bundle(missing)
  with pytest.raises(UserError):
    load_networks(Source(str(tmp_path / "empty")), ["vae"])


def test_source_options_must_fit_the_kind(sources, workdirs):
  ae, _ = workdirs
  with pytest.raises(UserInputError, match="step only applies to training workdirs"):
    Source(sources["diffusers"], step=3).resolved()
  with pytest.raises(UserInputError, match="step only applies .* native source"):
    load_bundle(Source(sources["native"], step=1))
  with pytest.raises(UserInputError, match="config_yaml only applies to single-file"):
    Source(sources["native"], config_yaml="x.yaml").resolved()
  with pytest.raises(UserInputError, match="config_yaml only applies .* workdir source"):
    Source(ae, config_yaml="x.yaml").resolved()
  with pytest.raises(UserInputError, match="Unknown source kind 'safetensors'"):
    Source(sources["single_file"], kind="safetensors").resolved()
  with pytest.raises(UserInputError, match="empty path"):
    Source("").resolved()
  # The options that do fit pass, and the kind is resolved once.
  assert Source(ae, step=1).resolved() == Source(ae, kind="workdir", step=1)
  assert Source(sources["single_file"], config_yaml="x.yaml").resolved().kind == "single_file"
  assert Source(ae, step=2, ema=False).resolved().describe() == f"workdir:{ae} step=2 ema=False"


# ------------------------------------------------------------------------- load_bundle


@pytest.mark.parametrize("kind", ["diffusers", "single_file", "native"])
def test_every_export_loads_the_same_model(sd1, sources, kind):
  path = sources[kind]
  for source in (path, Source(path, kind=kind)):  # detected, and named
    bundle = load_bundle(source)
    assert_trees_equal(bundle.unet_params, sd1.unet_params)
    assert_trees_equal(bundle.vae_params, sd1.vae_params)
    assert_trees_equal(bundle.text_encoder_params, sd1.text_encoder_params)
    assert bundle.vae == sd1.vae and bundle.text_encoder == sd1.text_encoder
    assert (bundle.scaling_factor, bundle.diffusion) == (sd1.scaling_factor, sd1.diffusion)
    assert bundle.tokenizer_path is not None
    assert bundle.metadata["source"] == f"{kind}:{path}"


def test_load_bundle_refuses_a_single_network(sources):
  unet = os.path.join(sources["diffusers"], "unet")
  with pytest.raises(UserInputError, match="holds one diffusers_model network, not a whole model"):
    load_bundle(unet)
  with pytest.raises(UserInputError, match="holds one transformers network"):
    load_bundle(os.path.join(sources["diffusers"], "text_encoder"))


# ----------------------------------------------------------------------- load_networks


def test_load_networks_returns_only_the_wanted_networks(sd1, sources, tmp_path):
  # A pipeline whose UNet weights are gone still gives its VAE and text encoder: only the
  # subdirectories asked for are read.
  pipeline = str(tmp_path / "pipeline")
  shutil.copytree(sources["diffusers"], pipeline)
  os.remove(os.path.join(pipeline, "unet", "diffusion_pytorch_model.safetensors"))
  found = load_networks(pipeline, ["vae", "text_encoder"])
  assert sorted(found.networks) == ["text_encoder", "vae"]
  assert found.scaling_factor == sd1.scaling_factor
  assert_trees_equal(found.networks["vae"].params, sd1.vae_params)
  assert_trees_equal(found.networks["text_encoder"].params, sd1.text_encoder_params)
  assert found.networks["vae"].module == sd1.vae
  assert list(load_networks(pipeline, ["text_encoder"]).networks) == ["text_encoder"]
  with pytest.raises(MissingInputError, match="No weights in directory .*unet"):
    load_networks(pipeline, ["unet"])

  # One network's directory: what it holds, if wanted; nothing else.
  unet_dir = os.path.join(sources["diffusers"], "unet")
  found = load_networks(unet_dir, ["unet", "vae", "text_encoder"])
  assert list(found.networks) == ["unet"]
  assert_trees_equal(found.networks["unet"].params, sd1.unet_params)
  assert load_networks(unet_dir, ["vae"]).networks == {}
  text_dir = os.path.join(sources["diffusers"], "text_encoder")
  assert list(load_networks(text_dir, ["unet", "text_encoder"]).networks) == ["text_encoder"]
  assert load_networks(text_dir, ["unet", "vae"]).networks == {}
  vq = load_networks(sources["vq"], ["vae"])
  assert type(vq.networks["vae"].module).__name__ == "VQModel" and vq.scaling_factor == 0.25

  # Whole-model files: the wanted subset.
  for kind in ("single_file", "native"):
    found = load_networks(sources[kind], ["unet"])
    assert list(found.networks) == ["unet"], kind
    assert_trees_equal(found.networks["unet"].params, sd1.unet_params)
  with pytest.raises(UserInputError, match=r"Unknown networks \['clip'\]"):
    load_networks(sources["native"], ["unet", "clip"])


# ---------------------------------------------------------------------- workdirs


def test_stage1_workdir_gives_its_autoencoder_and_scale(workdirs):
  ae, _ = workdirs
  state = _full_state(ae)
  found = load_networks(ae, ["unet", "vae", "text_encoder"])
  assert list(found.networks) == ["vae"]
  with open(os.path.join(ae, workdir_lib.STAGE1_SUMMARY)) as f:
    assert found.scaling_factor == pytest.approx(json.load(f)["latent_scale_factor"])
  # shapes_autoencoder keeps no EMA (ema_decay 0): the raw params, whatever `ema` says.
  assert_trees_equal(found.networks["vae"].params, state["params"]["vae"])
  assert load_networks(ae, ["unet"]).networks == {}
  with pytest.raises(UserInputError, match="'autoencoder' run, not a 'latent_diffusion' run"):
    load_bundle(ae)


def test_stage2_workdir_ema_and_raw_params_are_the_state_trees(workdirs):
  _, ldm = workdirs
  state = _full_state(ldm)
  ema, raw = load_bundle(ldm), load_bundle(Source(ldm, ema=False))
  for bundle, tree in ((ema, "ema_params"), (raw, "params")):
    assert_trees_equal(bundle.unet_params, state[tree]["unet"])
    assert_trees_equal(bundle.text_encoder_params, state[tree]["text_encoder"])
    assert bundle.metadata["step"] == 2 and bundle.vae_params is not None
  assert _differs(ema.unet_params, raw.unet_params)
  assert ema.metadata["source"] == f"workdir:{ldm} step=2 ema=True"
  assert raw.metadata["source"] == f"workdir:{ldm} step=2 ema=False"
  # An older step is another state.
  first = load_bundle(Source(ldm, step=1, ema=False))
  assert_trees_equal(first.unet_params, _full_state(ldm, 1)["params"]["unet"])
  assert _differs(first.unet_params, raw.unet_params)
  with pytest.raises(MissingInputError, match="committed steps: \\[1, 2\\]"):
    load_bundle(Source(ldm, step=7))


def test_restore_subtree_returns_only_the_asked_tree(workdirs):
  _, ldm = workdirs
  ckpt, step, config, _ = workdir_lib.read_run(ldm)
  from latent_diffusion_jax.models import build
  params = workdir_lib.restore_networks(ckpt, step, config, {"unet": build.build_unet(config.model)},
                                        use_ema=False)
  assert list(params) == ["unet"]
  assert_trees_equal(params["unet"], _full_state(ldm)["params"]["unet"])
  # Shapes that are not the checkpoint's: a restore error naming the step, not garbage.
  wide = build.build_unet(config.model).clone(block_out_channels=(32,))
  with pytest.raises(CheckpointRestoreError, match=f"checkpoint step {step}"):
    workdir_lib.restore_networks(ckpt, step, config, {"unet": wide}, use_ema=False)


def _ocdbt_values(state_dir):
  """(key, data file path, offset, length) of every value stored outside the b-tree nodes of an
  Orbax OCDBT state directory, from tensorstore's own dump of the index."""
  import tensorstore as ts
  kv = ts.KvStore.open(f"file://{state_dir}/").result()
  manifest = ts.ocdbt.dump(kv).result()
  version = manifest["versions"][-1]
  assert version["root_height"] == 0, "a one-node b-tree is expected for this tiny checkpoint"
  node = ts.ocdbt.dump(kv, version["root"]["location"]).result()
  out = []
  for entry in node["entries"]:
    if "indirect_value" in entry:
      # value:<base dir>/:<data file>:<offset>:<length>
      base, name, offset, length = entry["indirect_value"].removeprefix("value:").split(":")
      out.append((entry["key"].decode(), os.path.join(state_dir, base, name), int(offset),
                  int(length)))
  return out


def test_workdir_loads_for_sampling_without_its_optimizer_state(workdirs, tmp_path):
  """Orbax writes params, EMA params and AdamW moments into shared OCDBT data files, so the
  optimizer state cannot be deleted file by file; instead every byte of it is destroyed: data
  files holding only opt_state values (if the writer made any) are deleted, opt_state values in
  shared files overwritten.
  A full restore then fails, and the loader still reads both params trees exactly (a partial
  restore reads only their byte ranges). Values small enough to be inlined in the b-tree node
  (under 1 KiB) stay, as the node indexes every key."""
  _, original = workdirs
  state = _full_state(original)
  ldm = str(tmp_path / "ldm")
  shutil.copytree(original, ldm)
  state_dir = os.path.join(ldm, "checkpoints", "2", "state")
  values = _ocdbt_values(state_dir)
  by_file = {}
  for key, path, offset, length in values:
    by_file.setdefault(path, []).append((key.split(".")[0], offset, length))
  destroyed = 0
  for path, entries in by_file.items():
    if all(tree == "opt_state" for tree, _, _ in entries):
      os.remove(path)
      destroyed += sum(length for _, _, length in entries)
      continue
    with open(path, "r+b") as f:
      for tree, offset, length in entries:
        if tree == "opt_state":
          f.seek(offset)
          f.write(b"\xff" * length)
          destroyed += length
  opt_bytes = sum(length for key, _, _, length in values if key.startswith("opt_state."))
  assert destroyed == opt_bytes > 0
  assert {k.split(".")[0] for k, *_ in values} >= {"opt_state", "params", "ema_params"}

  with pytest.raises(CheckpointRestoreError, match="step 2"):
    _full_state(ldm)
  for ema, tree in ((True, "ema_params"), (False, "params")):
    bundle = load_bundle(Source(ldm, ema=ema))
    assert_trees_equal(bundle.unet_params, state[tree]["unet"])
    assert_trees_equal(bundle.text_encoder_params, state[tree]["text_encoder"])
  found = load_networks(ldm, ["unet"])
  assert list(found.networks) == ["unet"]
  assert_trees_equal(found.networks["unet"].params, state["ema_params"]["unet"])


def test_workdir_load_networks_reads_only_the_wanted_networks(workdirs, tmp_path):
  _, original = workdirs
  ldm = str(tmp_path / "ldm")
  shutil.copytree(original, ldm)
  os.remove(os.path.join(ldm, "frozen", "vae.safetensors"))
  found = load_networks(ldm, ["unet"])
  assert list(found.networks) == ["unet"] and found.scaling_factor > 0
  found = load_networks(ldm, ["text_encoder", "unet"])
  assert sorted(found.networks) == ["text_encoder", "unet"]
  with pytest.raises(MissingInputError, match="frozen/vae.safetensors is missing"):
    load_bundle(ldm)
  with pytest.raises(MissingInputError, match="frozen/vae.safetensors is missing"):
    load_networks(ldm, ["vae"])
