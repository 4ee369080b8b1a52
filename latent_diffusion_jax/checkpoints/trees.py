"""Param trees as safetensors files with flat "a/b/c" keys (our own layout, not PyTorch's)."""

import os
from typing import Any, Dict, Optional

import numpy as np
from flax import traverse_util
from latent_diffusion_jax.core.errors import MissingInputError

FROZEN_SUBDIR = "frozen"


def save_tree(path: str, tree: Any, metadata: Optional[Dict[str, str]] = None) -> None:
  """Writes a nested dict of arrays; bfloat16 and other ml_dtypes are kept as they are."""
  from safetensors.numpy import save_file
  import flax.linen as nn
  flat = traverse_util.flatten_dict(nn.meta.unbox(tree), sep="/")
  arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flat.items()}
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  save_file(arrays, tmp, metadata=metadata)
  os.replace(tmp, path)  # never leave a half-written file under the final name


def load_tree(path: str) -> Dict[str, Any]:
  from latent_diffusion_jax.interop.files import load_state_dict
  if not os.path.isfile(path):
    raise MissingInputError(f"No weights file {path!r}.")
  return traverse_util.unflatten_dict(load_state_dict(path), sep="/")


def save_frozen(workdir: str, *, vae_params: Any, text_params: Any = None) -> None:
  """Keeps the frozen networks of a stage-2 run inside its workdir, so the run is self-contained."""
  directory = os.path.join(workdir, FROZEN_SUBDIR)
  if not os.path.isfile(os.path.join(directory, "vae.safetensors")):
    save_tree(os.path.join(directory, "vae.safetensors"), vae_params)
  if text_params is not None and not os.path.isfile(os.path.join(directory, "text_encoder.safetensors")):
    save_tree(os.path.join(directory, "text_encoder.safetensors"), text_params)


def load_frozen(workdir: str, name: str) -> Optional[Dict[str, Any]]:
  path = os.path.join(workdir, FROZEN_SUBDIR, f"{name}.safetensors")
  return load_tree(path) if os.path.isfile(path) else None
