"""ControlNet weights in and out: diffusers `ControlNetModel` directories and original-layout files.

  controlnet, params, cfg = load_controlnet_dir("/models/control_canny")      # diffusers
  controlnet, params = load_controlnet_single_file("control_sd15_canny.safetensors", base_unet)
  export_controlnet(controlnet, params, "/tmp/my_control")   # ControlNetModel.from_pretrained

A diffusers directory holds config.json and diffusion_pytorch_model.safetensors. An original
checkpoint (lllyasviel's ControlNet, cldm.ControlNet) holds "control_model.*" keys, or the same
keys without the prefix (ControlNet 1.1, thibaud's SD 2.1 ones): input_blocks / middle_block like
the ldm UNet, input_hint_block (the hint encoder), zero_convs and middle_block_out. It carries no
config, so its layout is the base UNet's, and the hint encoder's widths are read from its
tensors.
"""

import json
import os
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from latent_diffusion_jax.core.errors import InputFileError, MissingInputError, UserInputError
from latent_diffusion_jax.interop import single_file_keys as keys
from latent_diffusion_jax.interop.convert import (flax_path_to_torch_key, flax_to_torch,
                                                   torch_to_flax)
from latent_diffusion_jax.interop.diffusers_config import (unet_from_diffusers_config,
                                                           unet_to_diffusers_config)
from latent_diffusion_jax.interop.export_diffusers import (ExportError, cast_state_dict,
                                                           numpy_dtype, save_safetensors)
from latent_diffusion_jax.interop.files import load_config, load_state_dict
from latent_diffusion_jax.models import controlnet as controlnet_lib
from latent_diffusion_jax.models.controlnet import ControlNetModel
from latent_diffusion_jax.models.unet import UNet2DConditionModel

CLASS_NAME = "ControlNetModel"
ORIGINAL_PREFIX = "control_model."
# diffusers ControlNetModel options we do not model, with the value that means "off".
_CONTROLNET_DEFAULTS = {"global_pool_conditions": False, "encoder_hid_dim_type": None,
                        "addition_embed_type_num_heads": 64}
_UNET_ONLY_KEYS = ("_class_name", "sample_size", "out_channels", "up_block_types", "dropout")


def is_controlnet_config(cfg: Dict[str, Any]) -> bool:
  return cfg.get("_class_name") == CLASS_NAME


def controlnet_from_diffusers_config(cfg: Dict[str, Any], **overrides) -> ControlNetModel:
  """Builds our ControlNet from a diffusers `ControlNetModel` config dict."""
  bad = {k: cfg[k] for k, off in _CONTROLNET_DEFAULTS.items() if k in cfg and cfg[k] != off}
  if bad:
    raise UserInputError(f"The diffusers ControlNet config uses options this package does not "
                         f"implement: {bad}.")
  # The encoder half is read as a UNet config would be (same keys, same checks); its up blocks
  # mirror the down blocks, which is all the UNet reader asks of them.
  down = list(cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
  unet_cfg = {k: v for k, v in cfg.items() if k not in _CONTROLNET_DEFAULTS}
  unet_cfg.update(down_block_types=down,
                  up_block_types=[t.replace("Down", "Up") for t in reversed(down)],
                  block_out_channels=cfg.get("block_out_channels", [320, 640, 1280, 1280]),
                  out_channels=cfg.get("in_channels", 4))
  hint_fields = ("conditioning_channels", "conditioning_embedding_out_channels",
                 "conditioning_channel_order")
  unet = unet_from_diffusers_config(
      unet_cfg, **{k: v for k, v in overrides.items() if k not in hint_fields})
  return controlnet_lib.controlnet_like(
      unet, conditioning_channels=int(cfg.get("conditioning_channels", 3)),
      conditioning_embedding_out_channels=tuple(cfg.get("conditioning_embedding_out_channels")
                                                or (16, 32, 96, 256)),
      conditioning_channel_order=cfg.get("controlnet_conditioning_channel_order", "rgb"),
      **{k: v for k, v in overrides.items() if k in hint_fields})


def controlnet_to_diffusers_config(controlnet: ControlNetModel) -> Dict[str, Any]:
  """The diffusers `ControlNetModel` config dict that describes `controlnet`."""
  if not controlnet.mid_block_attention:
    raise ExportError("This ControlNet's mid block has no attention (mid_block_attention=False); "
                      "diffusers' ControlNetModel has no such mid block (its UNetMidBlock2D holds "
                      "one ResNet, ours two). Keep it in our own format (a training workdir).")
  cfg = unet_to_diffusers_config(controlnet.as_unet(), sample_size=0)
  for key in _UNET_ONLY_KEYS:
    cfg.pop(key, None)
  cfg.update(
      _class_name=CLASS_NAME, conditioning_channels=controlnet.conditioning_channels,
      conditioning_embedding_out_channels=list(controlnet.conditioning_embedding_out_channels),
      controlnet_conditioning_channel_order=controlnet.conditioning_channel_order,
      global_pool_conditions=False)
  return cfg


def load_controlnet_dir(directory: str, *, allow_pickle: bool = False,
                        **overrides) -> Tuple[ControlNetModel, Any, dict]:
  """Loads a diffusers `ControlNetModel` directory.

  Returns:
    (module, params as numpy arrays, the diffusers config dict).
  """
  if not os.path.isdir(directory):
    raise MissingInputError(f"No ControlNet directory at {directory!r}.")
  cfg = load_config(directory)
  if not is_controlnet_config(cfg):
    held = cfg.get("_class_name", "model without _class_name")
    raise UserInputError(f"{directory!r} holds a {held}, not a diffusers {CLASS_NAME}.")
  controlnet = controlnet_from_diffusers_config(cfg, **overrides)
  params = torch_to_flax(load_state_dict(directory, allow_pickle=allow_pickle),
                         controlnet_lib.abstract_params(controlnet),
                         what=f"the ControlNet in {directory}")
  return controlnet, params, cfg


def export_controlnet(controlnet: ControlNetModel, params: Any, out_dir: str, *,
                      dtype: str = "float32", metadata: Optional[Dict[str, str]] = None) -> str:
  """Writes a diffusers `ControlNetModel` directory (config.json and safetensors weights),
  loadable with `diffusers.ControlNetModel.from_pretrained(out_dir)`; returns `out_dir`."""
  numpy_dtype(dtype)
  cfg = controlnet_to_diffusers_config(controlnet)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
  from latent_diffusion_jax import __version__
  header = {"format": "pt", "latent_diffusion_jax_version": __version__,
            "config": json.dumps(cfg, sort_keys=True), **(metadata or {})}
  save_safetensors(cast_state_dict(flax_to_torch(params), dtype),
                   os.path.join(out_dir, "diffusion_pytorch_model.safetensors"), header)
  return out_dir


# --- original layout (cldm.ControlNet) ---------------------------------------------------------


def controlnet_key_to_ldm(controlnet: ControlNetModel) -> Callable[[str], str]:
  """The map diffusers ControlNet key -> original key (without "control_model.")."""
  unet_map = keys.unet_key_to_ldm(controlnet.as_unet())
  last_hint = 2 * (2 * (len(controlnet.conditioning_embedding_out_channels) - 1) + 1)

  def to_ldm(key: str) -> str:
    module, _, leaf = key.rpartition(".")
    parts = module.split(".")
    if parts[0] == "controlnet_down_blocks":
      return f"zero_convs.{parts[1]}.0.{leaf}"
    if module == "controlnet_mid_block":
      return f"middle_block_out.0.{leaf}"
    if parts[0] == "controlnet_cond_embedding":
      if parts[1] == "conv_in":
        return f"input_hint_block.0.{leaf}"
      if parts[1] == "conv_out":
        return f"input_hint_block.{last_hint}.{leaf}"
      return f"input_hint_block.{2 * (int(parts[2]) + 1)}.{leaf}"  # blocks.k, after each SiLU
    return unet_map(key)

  return to_ldm


def _torch_keys(abstract: Any):
  from flax import traverse_util
  from latent_diffusion_jax.core.parallel import unbox
  flat = traverse_util.flatten_dict(unbox(abstract))
  return [flax_path_to_torch_key(p[:-1], "bias" if p[-1] == "bias" else "weight") for p in flat]


def _strip_prefix(state_dict: Dict[str, Any], path: str) -> Dict[str, Any]:
  if "time_embed.0.weight" in state_dict:
    return state_dict
  out = {k[len(ORIGINAL_PREFIX):]: v for k, v in state_dict.items()
         if k.startswith(ORIGINAL_PREFIX)}
  if "time_embed.0.weight" not in out:
    raise InputFileError(f"{path} is no original-layout ControlNet: it has neither "
                         f"'{ORIGINAL_PREFIX}time_embed.0.weight' nor 'time_embed.0.weight'.")
  return out


def _hint_widths(state_dict: Dict[str, Any], path: str) -> Tuple[int, Tuple[int, ...]]:
  """(control image channels, hint encoder widths) read from input_hint_block's kernels."""
  convs = sorted(int(k.split(".")[1]) for k in state_dict
                 if k.startswith("input_hint_block.") and k.endswith(".weight"))
  if len(convs) < 2 or len(convs) % 2:
    raise InputFileError(f"{path}: input_hint_block has {len(convs)} convolutions; expected an "
                         "even number (conv_in, two per width step, conv_out).")
  shapes = [np.shape(state_dict[f"input_hint_block.{i}.weight"]) for i in convs]
  widths = [shapes[0][0]] + [s[0] for s in shapes[2:-1:2]]
  return int(shapes[0][1]), tuple(int(w) for w in widths)


def load_controlnet_single_file(path: str, base_unet: Optional[UNet2DConditionModel], *,
                                allow_pickle: bool = False,
                                **overrides) -> Tuple[ControlNetModel, Any]:
  """Imports an original-layout ControlNet checkpoint (see the module docstring).

  Args:
    path: a `.safetensors` file (`.pth`/`.ckpt` with `allow_pickle`).
    base_unet: the UNet it controls, whose layout the file shares (the file stores none).
    allow_pickle: accept pickle files, which run code when loaded.
    **overrides: module overrides such as dtype or attention_impl.

  Returns:
    (module, params as numpy arrays).
  """
  if base_unet is None:
    raise MissingInputError(f"{path} is an original-layout ControlNet, which records no layout of "
                            "its own: give the base model (--model ...) whose UNet it controls.")
  state_dict = _strip_prefix(load_state_dict(path, allow_pickle=allow_pickle), path)
  channels, widths = _hint_widths(state_dict, path)
  controlnet = controlnet_lib.controlnet_like(
      base_unet, conditioning_channels=channels, conditioning_embedding_out_channels=widths,
      **overrides)
  reference = controlnet_lib.abstract_params(controlnet)
  diffusers_sd = keys.from_ldm_state_dict(state_dict, _torch_keys(reference),
                                          controlnet_key_to_ldm(controlnet), "")
  params = torch_to_flax(diffusers_sd, reference,
                         what=f"the ControlNet of {path} (read with the base UNet's layout)")
  return controlnet, params


def export_controlnet_single_file(controlnet: ControlNetModel, params: Any, path: str, *,
                                  dtype: str = "float32") -> str:
  """Writes `controlnet` as an original-layout safetensors file ("control_model.*" keys)."""
  if not path.endswith(".safetensors"):
    raise UserInputError(f"Single-file checkpoints are written as .safetensors; got {path!r}.")
  numpy_dtype(dtype)
  state_dict = keys.to_ldm_state_dict(flax_to_torch(params), controlnet_key_to_ldm(controlnet),
                                      ORIGINAL_PREFIX)
  from latent_diffusion_jax import __version__
  return save_safetensors(cast_state_dict(state_dict, dtype), path,
                          {"format": "pt", "latent_diffusion_jax_version": __version__})
