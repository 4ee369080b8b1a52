"""Reading PyTorch weight files: safetensors always, pickles only when explicitly allowed."""

import json
import os
from typing import Dict, Sequence

import numpy as np
from latent_diffusion_jax.core.errors import InputFileError, MissingInputError, UserInputError

_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
_SAFETENSORS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
_INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")


class PickleRefusedError(InputFileError):
  """Raised for a pickle checkpoint when loading pickles was not explicitly allowed."""


def _pickle_message(path: str) -> str:
  return (f"{path} is a pickle file (.bin/.ckpt/.pt). Unpickling runs arbitrary code stored in the "
          "file, so it is refused by default. Convert it to safetensors, or pass allow_pickle=True "
          "(--allow_pickle) if you trust where it came from.")


def _read_safetensors(path: str) -> Dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  try:
    return dict(load_file(path))
  except Exception as e:  # bfloat16 files: numpy has no bf16 dtype in safetensors.numpy
    if "bf16" not in str(e).lower() and "bfloat16" not in str(e).lower():
      raise
  from safetensors import safe_open
  import ml_dtypes
  out = {}
  with safe_open(path, framework="flax") as f:  # jax arrays keep bf16
    for key in f.keys():
      out[key] = np.asarray(f.get_tensor(key)).astype(ml_dtypes.bfloat16)
  return out


def _read_pickle(path: str) -> Dict[str, np.ndarray]:
  import torch  # only needed for the opt-in pickle path
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in obj.items()}


def load_state_dict(path: str, *, allow_pickle: bool = False,
                    names: Sequence[str] = _SAFETENSORS_NAMES) -> Dict[str, np.ndarray]:
  """Loads a state dict from a weights file or a model directory.

  Args:
    path: a `.safetensors` file, a pickle file (with `allow_pickle`), or a directory holding
      `diffusion_pytorch_model.safetensors` / `model.safetensors` or their sharded index.
    allow_pickle: permit `.bin`/`.ckpt`/`.pt` files, which can execute code when loaded.
    names: the single-file weight names to look for in a directory.

  Returns:
    PyTorch key -> numpy array.
  """
  if not os.path.exists(path):
    raise MissingInputError(f"No weights at {path!r}: the path does not exist.")
  if os.path.isdir(path):
    for name in names:
      if os.path.isfile(os.path.join(path, name)):
        return _read_safetensors(os.path.join(path, name))
    for name in _INDEX_NAMES:
      index = os.path.join(path, name)
      if os.path.isfile(index):
        with open(index) as f:
          shards = sorted(set(json.load(f)["weight_map"].values()))
        out = {}
        for shard in shards:
          out.update(_read_safetensors(os.path.join(path, shard)))
        return out
    pickles = sorted(p for p in os.listdir(path) if p.endswith(_PICKLE_SUFFIXES))
    if pickles:
      if not allow_pickle:
        raise PickleRefusedError(_pickle_message(os.path.join(path, pickles[0])))
      return _read_pickle(os.path.join(path, pickles[0]))
    raise MissingInputError(
        f"No weights in directory {path!r}: expected one of {list(names) + list(_INDEX_NAMES)}; "
        f"found {sorted(os.listdir(path))}.")
  if path.endswith(".safetensors"):
    return _read_safetensors(path)
  if path.endswith(_PICKLE_SUFFIXES):
    if not allow_pickle:
      raise PickleRefusedError(_pickle_message(path))
    return _read_pickle(path)
  raise UserInputError(f"Unknown weights format for {path!r}: expected .safetensors "
                   f"(or {', '.join(_PICKLE_SUFFIXES)} with allow_pickle).")


def load_config(directory: str) -> dict:
  """Reads `config.json` of a diffusers/transformers model directory."""
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise MissingInputError(f"No config.json in {directory!r}; a model directory needs one.")
  with open(path) as f:
    return json.load(f)
