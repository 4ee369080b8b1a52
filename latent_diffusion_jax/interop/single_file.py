"""Single-file checkpoints in the original Stable Diffusion layout, with their inference yaml.

`export_single_file` writes one safetensors file holding `model.diffusion_model.*` (UNet),
`first_stage_model.*` (VAE) and `cond_stage_model.*` (text encoder), plus `<name>.yaml` beside it
in the layout of the original `v1-inference.yaml` / `v2-inference-v.yaml`; ComfyUI, the AUTOMATIC1111
web UI, the original ldm scripts and `diffusers.StableDiffusionPipeline.from_single_file` read this
pair. `load_single_file` imports such a pair (ours or third-party) into a ModelBundle.

The original yaml cannot say everything our modules can (GroupNorm group counts, CLIP head counts,
zero-terminal-SNR schedules, ...). Those fields go into an extra top-level `latent_diffusion_jax:`
section, which the original tools ignore and which makes our own round trip exact.
"""

import json
import os
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp

from latent_diffusion_jax.interop import single_file_keys as keys
from latent_diffusion_jax.interop import single_file_config as sf_config
from latent_diffusion_jax.interop.clip import clip_params_to_torch
from latent_diffusion_jax.interop.convert import flax_path_to_torch_key, flax_to_torch, torch_to_flax
from latent_diffusion_jax.interop.diffusers import abstract_unet_params, abstract_vae_params
from latent_diffusion_jax.interop.export_diffusers import (ExportError, cast_state_dict,
                                                           copy_tokenizer, header_metadata,
                                                           numpy_dtype, save_safetensors)
from latent_diffusion_jax.interop.files import load_state_dict
from latent_diffusion_jax.models.bundle import ModelBundle
from latent_diffusion_jax.models.text_encoders import CLIPTextModel
from latent_diffusion_jax.core.parallel import unbox
from latent_diffusion_jax.core.errors import UserInputError, MissingInputError

TEXT_LAYOUTS = ("auto", "clip", "open_clip")
# Buffers and heads of the original checkpoints that our modules do not hold.
_IGNORED_TEXT_SUFFIXES = ("position_ids", "text_projection", "logit_scale", "attn_mask")


def sidecar_paths(path: str) -> Dict[str, str]:
  """Where the yaml and tokenizer of a single-file checkpoint live: beside it, same stem."""
  stem = os.path.splitext(path)[0]
  return {"config": stem + ".yaml", "tokenizer": stem + "_tokenizer"}


def _text_layout(bundle: ModelBundle, text_layout: str) -> Optional[str]:
  te = bundle.text_encoder
  if text_layout not in TEXT_LAYOUTS:
    raise UserInputError(f"Unknown text_layout {text_layout!r}; valid: {', '.join(TEXT_LAYOUTS)}.")
  if te is None:
    return None
  if not isinstance(te, CLIPTextModel):
    raise ExportError(
        f"The text encoder is a {type(te).__name__} (the LDM paper's jointly trained "
        "conditioner); this package writes no original-layout keys for it. Export the model "
        "with --format native (export_native).")
  if text_layout == "auto":
    # SD 1.x conditions on OpenAI CLIP (quick_gelu), SD 2.x on OpenCLIP (gelu).
    text_layout = "open_clip" if te.hidden_act == "gelu" else "clip"
  if text_layout == "clip" and te.output_layer != "last":
    raise ExportError(
        "The original FrozenCLIPEmbedder reads CLIP's last layer; this text encoder reads its "
        "penultimate one. Use text_layout='open_clip' (SD 2.x's conditioner, which reads the "
        "penultimate layer) or --format native / diffusers.")
  return text_layout


def _text_state_dict(bundle: ModelBundle, layout: str) -> Dict[str, Any]:
  state_dict = clip_params_to_torch(bundle.text_encoder_params)
  if layout == "clip":
    return keys.to_ldm_state_dict(state_dict, keys.clip_key_to_ldm, keys.CLIP_PREFIX)
  return keys.to_ldm_state_dict(state_dict, keys.open_clip_key_to_ldm, keys.OPEN_CLIP_PREFIX)


def export_single_file(bundle: ModelBundle, path: str, *, dtype: str = "float32",
                       text_layout: str = "auto") -> Dict[str, str]:
  """Writes `bundle` as one original-layout safetensors file plus its inference yaml.

  Args:
    bundle: the model. Its UNet must fit the original UNetModel (mid-block attention, channel
      widths that are multiples of the first) and its text encoder must be a CLIPTextModel or None.
    path: the `.safetensors` file to write; `<stem>.yaml` and, when the bundle has a tokenizer,
      `<stem>_tokenizer/` are written beside it.
    dtype: "float32", "float16" or "bfloat16".
    text_layout: "clip" (SD 1.x FrozenCLIPEmbedder: `cond_stage_model.transformer.text_model.*`),
      "open_clip" (SD 2.x FrozenOpenCLIPEmbedder: `cond_stage_model.model.*`, fused q/k/v), or
      "auto": open_clip for gelu encoders (OpenCLIP), clip otherwise.

  Returns:
    {"checkpoint": path, "config": yaml path[, "tokenizer": directory]}.

  Raises:
    ExportError / ValueError: a network has no original layout; the message names the format
      that can hold it.
  """
  if not path.endswith(".safetensors"):
    raise UserInputError(f"Single-file checkpoints are written as .safetensors; got {path!r}.")
  if bundle.first_stage_kind == "vq":
    raise ExportError("Single-file export writes Stable Diffusion's layout, whose first stage is "
                      "an AutoencoderKL; this model's is a VQModel. Export it with --format "
                      "native, or --format diffusers (an LDMTextToImagePipeline).")
  numpy_dtype(dtype)
  layout = _text_layout(bundle, text_layout)
  original = sf_config.original_config(bundle, layout)
  state_dict = keys.to_ldm_state_dict(flax_to_torch(bundle.unet_params),
                                      keys.unet_key_to_ldm(bundle.unet), keys.UNET_PREFIX)
  state_dict.update(keys.to_ldm_state_dict(flax_to_torch(bundle.vae_params),
                                           keys.vae_key_to_ldm(bundle.vae), keys.VAE_PREFIX))
  if layout is not None:
    state_dict.update(_text_state_dict(bundle, layout))
  save_safetensors(cast_state_dict(state_dict, dtype), path, header_metadata(bundle, original))
  written = {"checkpoint": path, "config": sidecar_paths(path)["config"]}
  sf_config.write_yaml(original, written["config"])
  if bundle.tokenizer_path is not None:
    written["tokenizer"] = copy_tokenizer(bundle.tokenizer_path, sidecar_paths(path)["tokenizer"],
                                          bundle.max_length)
  return written


def _torch_keys(abstract_params: Any):
  """The PyTorch (diffusers/transformers) keys of a Flax param tree, without materializing it."""
  from flax import traverse_util
  flat = traverse_util.flatten_dict(unbox(abstract_params))
  return [flax_path_to_torch_key(p[:-1], "bias" if p[-1] == "bias" else "weight") for p in flat]


def _read_config(path: str, config_yaml: Optional[str]) -> dict:
  if config_yaml is None:
    config_yaml = sidecar_paths(path)["config"]
    if not os.path.isfile(config_yaml):
      header = _header_config(path)
      if header is not None:
        return header
      raise MissingInputError(
          f"No inference yaml for {path!r}: looked for {config_yaml!r}. Pass config_yaml= "
          "(--config_yaml) with the model's original config, e.g. v1-inference.yaml for SD 1.x or "
          "v2-inference-v.yaml for SD 2.x 768-v.")
  if not os.path.isfile(config_yaml):
    raise MissingInputError(f"No inference yaml at {config_yaml!r}.")
  return sf_config.read_yaml(config_yaml)


def _header_config(path: str) -> Optional[dict]:
  """The original config our exporter stored in the safetensors header, if any."""
  if not path.endswith(".safetensors"):
    return None
  from safetensors import safe_open
  with safe_open(path, framework="numpy") as f:
    meta = f.metadata() or {}
  if "latent_diffusion_jax_version" not in meta or "config" not in meta:
    return None
  return json.loads(meta["config"])


def _split_networks(state_dict: Dict[str, Any], use_ema: bool) -> Dict[str, Dict[str, Any]]:
  parts = {"unet": {}, "vae": {}, "text": {}}
  for key, value in state_dict.items():
    if key.startswith(keys.UNET_PREFIX):
      parts["unet"][key] = value
    elif key.startswith(keys.VAE_PREFIX):
      if not key.startswith(keys.VAE_PREFIX + "loss."):  # training-time LPIPS/discriminator
        parts["vae"][key] = value
    elif key.startswith("cond_stage_model."):
      if not key.endswith(_IGNORED_TEXT_SUFFIXES):
        parts["text"][key] = value
  if use_ema:
    # ldm's LitEma stores "model.diffusion_model.a.b" as "model_ema.diffusion_modelab".
    ema = {k: state_dict.get("model_ema." + k[len("model."):].replace(".", "")) for k in parts["unet"]}
    if any(v is None for v in ema.values()):
      raise UserInputError("use_ema=True, but the checkpoint holds no complete model_ema.* copy of "
                       "the UNet.")
    parts["unet"] = ema
  return parts


def load_single_file(path: str, *, config_yaml: Optional[str] = None, allow_pickle: bool = False,
                     use_ema: bool = False, tokenizer_path: Optional[str] = None,
                     **overrides) -> ModelBundle:
  """Imports an original-layout Stable Diffusion checkpoint (SD 1.x / 2.x) into a ModelBundle.

  Args:
    path: a `.safetensors` file; `.ckpt` only with `allow_pickle`.
    config_yaml: the original inference yaml; default `<stem>.yaml` beside the file, then the
      config our exporter stores in the safetensors header.
    allow_pickle: accept pickle checkpoints (`.ckpt`, `.pt`, `.bin`), which run code when loaded.
    use_ema: read the UNet from the `model_ema.*` copy that training checkpoints carry.
    tokenizer_path: a local CLIP tokenizer directory; default `<stem>_tokenizer/` if it exists.
    **overrides: module overrides such as dtype or attention_impl, applied to every network.

  Returns:
    The bundle; params are host numpy arrays in each module's param dtype.

  Raises:
    PickleRefusedError: a pickle file without `allow_pickle`.
    WeightImportError: weights that do not fit the modules the yaml describes (missing,
      unexpected and mis-shaped keys are listed together).
  """
  # Weights first: a refused pickle is the answer whatever the config says.
  parts = _split_networks(load_state_dict(path, allow_pickle=allow_pickle), use_ema)
  original = _read_config(path, config_yaml)
  modules = sf_config.modules_from_original(original, parts["text"], **overrides)

  unet, vae, text = modules["unet"], modules["vae"], modules["text_encoder"]
  unet_ref = abstract_unet_params(unet)
  unet_sd = keys.from_ldm_state_dict(parts["unet"], _torch_keys(unet_ref),
                                     keys.unet_key_to_ldm(unet), keys.UNET_PREFIX)
  unet_params = torch_to_flax(unet_sd, unet_ref, what=f"the UNet (model.diffusion_model.*) of {path}")
  vae_ref = abstract_vae_params(vae)
  vae_sd = keys.from_ldm_state_dict(parts["vae"], _torch_keys(vae_ref), keys.vae_key_to_ldm(vae),
                                    keys.VAE_PREFIX)
  vae_params = torch_to_flax(vae_sd, vae_ref, what=f"the VAE (first_stage_model.*) of {path}")

  text_params = None
  if text is not None:
    text_ref = jax.eval_shape(text.init, jax.random.key(0),
                              jnp.zeros((1, text.max_position_embeddings), jnp.int32))["params"]
    if modules["text_layout"] == "open_clip":
      to_ldm, prefix = keys.open_clip_key_to_ldm, keys.OPEN_CLIP_PREFIX
    else:
      to_ldm, prefix = keys.clip_key_to_ldm, keys.CLIP_PREFIX
    text_sd = keys.from_ldm_state_dict(parts["text"], _torch_keys(text_ref), to_ldm, prefix)
    text_params = torch_to_flax(text_sd, text_ref,
                                what=f"the text encoder (cond_stage_model.*) of {path}")
  elif parts["text"]:
    raise UserInputError(f"{path} holds cond_stage_model.* weights, but its config names no text "
                     "encoder this package can build.")

  if tokenizer_path is None and os.path.isdir(sidecar_paths(path)["tokenizer"]):
    tokenizer_path = sidecar_paths(path)["tokenizer"]
  return ModelBundle(
      unet=unet, unet_params=unet_params, vae=vae, vae_params=vae_params, text_encoder=text,
      text_encoder_params=text_params, tokenizer_path=tokenizer_path,
      scaling_factor=modules["scaling_factor"], diffusion=modules["diffusion"],
      image_size=modules["image_size"], max_length=modules["max_length"],
      metadata={"source": path, **modules["metadata"]},
      image_conditioning=modules["image_conditioning"])
