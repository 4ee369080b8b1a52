"""Single-file checkpoints in the original Stable Diffusion layout, with their inference yaml.

Proven three ways: our round trip is bit-identical; diffusers' own conversion functions
(single_file_utils) turn our file into exactly the state dicts of our diffusers export; and
`StableDiffusionPipeline.from_single_file` loads it offline with those weights.
"""

import dataclasses
import json
import os

import numpy as np
import pytest
from safetensors import safe_open

from latent_diffusion_jax.interop import single_file_config as sf_config
from latent_diffusion_jax.interop.export_diffusers import ExportError, export_diffusers
from latent_diffusion_jax.interop.files import PickleRefusedError
from latent_diffusion_jax.interop.single_file import export_single_file, load_single_file
from latent_diffusion_jax.models.text_encoders import CLIPTextModel
from tiny_bundles import assert_trees_equal, cached_bundle


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def exported(request, tmp_path_factory):
  """(kind, bundle, single-file paths, diffusers export dir)."""
  bundle = cached_bundle(request.param, tmp_path_factory)
  root = tmp_path_factory.mktemp(f"single_{request.param}")
  written = export_single_file(bundle, str(root / "model.safetensors"))
  export_diffusers(bundle, str(root / "diffusers"))
  return request.param, bundle, written, str(root / "diffusers")


def _read(path):
  with safe_open(path, "np") as f:
    return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _diffusers_files(directory):
  out = {}
  for sub, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                    ("text_encoder", "model")):
    out[sub] = _read(os.path.join(directory, sub, f"{name}.safetensors"))[0]
  return out


def test_round_trip_is_bit_identical(exported):
  _, bundle, written, _ = exported
  back = load_single_file(written["checkpoint"])
  for a, b in ((bundle.unet_params, back.unet_params), (bundle.vae_params, back.vae_params),
               (bundle.text_encoder_params, back.text_encoder_params)):
    assert_trees_equal(a, b)
  assert (back.unet, back.vae, back.text_encoder) == (bundle.unet, bundle.vae, bundle.text_encoder)
  assert back.diffusion == bundle.diffusion and back.scaling_factor == bundle.scaling_factor
  assert (back.image_size, back.max_length) == (bundle.image_size, bundle.max_length)
  assert back.tokenizer_path == written["tokenizer"]


def test_original_layout_details(exported):
  kind, bundle, written, _ = exported
  tensors, meta = _read(written["checkpoint"])
  prefixes = {k.split(".")[0] for k in tensors}
  assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
  assert "model.diffusion_model.input_blocks.0.0.weight" in tensors
  assert "model.diffusion_model.middle_block.1.proj_in.weight" in tensors
  c = bundle.vae.block_out_channels[-1]
  for name in ("q", "k", "v", "proj_out"):  # 1x1 convs in the original VAE attention
    assert tensors[f"first_stage_model.decoder.mid.attn_1.{name}.weight"].shape == (c, c, 1, 1)
  assert "first_stage_model.decoder.up.0.block.0.norm1.weight" in tensors
  width = bundle.text_encoder.hidden_size
  if kind == "sd1":
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in tensors
  else:  # OpenCLIP: fused q/k/v, every layer of the tower (the original skips the last itself)
    fused = tensors["cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight"]
    assert fused.shape == (3 * width, width)
    assert "model.diffusion_model.label_emb.weight" in tensors
  original = sf_config.read_yaml(written["config"])
  assert json.loads(meta["config"]) == original and meta["step"] == "1234"
  params = original["model"]["params"]
  assert params["parameterization" if kind == "sd2" else "scale_factor"] == (
      "v" if kind == "sd2" else 0.5)
  assert params["unet_config"]["params"]["use_checkpoint"] is False


@pytest.mark.parity
def test_diffusers_conversion_functions_produce_our_diffusers_export(exported):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from diffusers.loaders import single_file_utils as sfu
  kind, bundle, written, diffusers_dir = exported
  checkpoint = {k: torch.from_numpy(v) for k, v in _read(written["checkpoint"])[0].items()}
  expected = _diffusers_files(diffusers_dir)
  with open(os.path.join(diffusers_dir, "unet", "config.json")) as f:
    unet_cfg = json.load(f)
  with open(os.path.join(diffusers_dir, "vae", "config.json")) as f:
    vae_cfg = json.load(f)
  converted = {"unet": sfu.convert_ldm_unet_checkpoint(checkpoint, unet_cfg),
               "vae": sfu.convert_ldm_vae_checkpoint(checkpoint, vae_cfg)}
  if kind == "sd1":
    converted["text_encoder"] = sfu.convert_ldm_clip_checkpoint(checkpoint)
  else:
    text_cfg = transformers.CLIPTextConfig.from_pretrained(os.path.join(diffusers_dir, "text_encoder"))
    text = sfu.convert_open_clip_checkpoint(transformers.CLIPTextModel(text_cfg), checkpoint)
    # The diffusers directory holds the tower without its unused last layer (as SD 2 ships).
    last = f"text_model.encoder.layers.{bundle.text_encoder.num_hidden_layers - 1}."
    converted["text_encoder"] = {k: v for k, v in text.items() if not k.startswith(last)}
  for name, theirs in converted.items():
    assert set(theirs) == set(expected[name]), (name, sorted(set(theirs) ^ set(expected[name]))[:8])
    for key, value in theirs.items():
      np.testing.assert_array_equal(value.numpy(), expected[name][key], err_msg=f"{name}: {key}")


@pytest.mark.parity
def test_from_single_file_loads_our_file_offline(exported):
  diffusers = pytest.importorskip("diffusers")
  kind, _, written, diffusers_dir = exported
  variants = [dict(config=diffusers_dir)]
  if kind == "sd1":  # the sd2 tiny model uses GroupNorm counts the original yaml cannot state
    variants.append(dict(config=diffusers_dir, original_config=written["config"]))
  expected = _diffusers_files(diffusers_dir)
  for kwargs in variants:
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        written["checkpoint"], local_files_only=True, **kwargs)
    for name in ("unet", "vae", "text_encoder"):
      ours = {k.removeprefix("text_model."): v for k, v in expected[name].items()}
      theirs = {k.removeprefix("text_model."): v.numpy()
                for k, v in getattr(pipe, name).state_dict().items()
                if not k.endswith("position_ids")}
      assert set(theirs) == set(ours), (kind, list(kwargs), name)
      for key, value in theirs.items():
        np.testing.assert_array_equal(value, ours[key], err_msg=f"{name}: {key}")


def test_yaml_fields_alone_describe_an_sd_shaped_model(tmp_path, tmp_path_factory):
  """Third-party yaml has no latent_diffusion_jax section: the SD fields must suffice."""
  bundle = cached_bundle("sd1", tmp_path_factory)
  written = export_single_file(bundle, str(tmp_path / "m.safetensors"))
  original = sf_config.read_yaml(written["config"])
  extras = original.pop(sf_config.EXTRAS_KEY)
  # Tiny CLIP widths break the 64-wide-head rule of real SD conditioners; keep only that part.
  original[sf_config.EXTRAS_KEY] = {"text_encoder": extras["text_encoder"]}
  sf_config.write_yaml(original, written["config"])
  back = load_single_file(written["checkpoint"])
  assert (back.unet, back.vae) == (bundle.unet, bundle.vae)
  assert back.diffusion == bundle.diffusion
  assert (back.image_size, back.max_length) == (bundle.image_size, bundle.max_length)
  assert_trees_equal(back.unet_params, bundle.unet_params)


def test_fp16_file_and_header_config_fallback(tmp_path, tmp_path_factory):
  bundle = cached_bundle("sd2", tmp_path_factory)
  written = export_single_file(bundle, str(tmp_path / "m.safetensors"), dtype="float16")
  tensors, _ = _read(written["checkpoint"])
  assert {v.dtype for v in tensors.values()} == {np.dtype("float16")}
  os.remove(written["config"])  # the config stored in the header takes over
  back = load_single_file(written["checkpoint"])
  assert back.unet == bundle.unet and back.text_encoder == bundle.text_encoder
  unet_leaf = back.unet_params["conv_in"]["kernel"]
  np.testing.assert_allclose(unet_leaf, bundle.unet_params["conv_in"]["kernel"], rtol=1e-3,
                             atol=1e-3)


def test_pickles_are_refused_without_allow_pickle(tmp_path):
  torch = pytest.importorskip("torch")
  path = str(tmp_path / "model.ckpt")
  torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}}, path)
  with pytest.raises(PickleRefusedError, match="arbitrary code"):
    load_single_file(path)


def test_models_without_an_original_layout_are_refused(tmp_path, tmp_path_factory):
  ldm = cached_bundle("ldm", tmp_path_factory)
  with pytest.raises(ExportError, match="--format native"):
    export_single_file(ldm, str(tmp_path / "a.safetensors"))
  sd1 = cached_bundle("sd1", tmp_path_factory)
  no_mid = dataclasses.replace(sd1, unet=sd1.unet.clone(mid_block_attention=False))
  with pytest.raises(ValueError, match="mid_block_attention"):
    export_single_file(no_mid, str(tmp_path / "b.safetensors"))
  with pytest.raises(ExportError, match="penultimate"):
    penultimate = dataclasses.replace(sd1, text_encoder=sd1.text_encoder.clone(
        output_layer="penultimate"))
    export_single_file(penultimate, str(tmp_path / "c.safetensors"), text_layout="clip")


def test_sd2_conditioner_depth_rules():
  """SD 2 runs ViT-H/14's first 23 of 24 layers, however many layers the file stores."""
  cut = CLIPTextModel(hidden_size=1024, num_hidden_layers=23, hidden_act="gelu")
  assert sf_config._open_clip_layer(cut) == "penultimate"
  assert sf_config._open_clip_layer(cut.clone(num_hidden_layers=24, output_layer="penultimate")) \
      == "penultimate"
  assert sf_config._open_clip_layer(cut.clone(num_hidden_layers=24)) == "last"

  def imported(depth):
    p = "cond_stage_model.model."
    text_sd = {p + "token_embedding.weight": np.zeros((10, 128)),
               p + "positional_embedding": np.zeros((77, 128)),
               **{p + f"transformer.resblocks.{i}.mlp.c_fc.weight": np.zeros((512, 128))
                  for i in range(depth)}}
    cond = {"target": sf_config._OPEN_CLIP_TARGET, "params": {"layer": "penultimate"}}
    module, layout = sf_config._text_from_original(cond, text_sd, {}, {})
    return module.num_hidden_layers, module.output_layer, module.num_attention_heads, layout

  assert imported(24) == (24, "penultimate", 2, "open_clip")
  assert imported(23) == (23, "last", 2, "open_clip")
