"""Mechanical conversion between PyTorch state dicts and our Flax parameter trees.

Our module tree mirrors the diffusers/transformers module tree, so a PyTorch key maps to a Flax path by
two rules: a numeric part joins the part before it (`down_blocks.0` -> `down_blocks_0`), and the leaf
is renamed by what the Flax tree holds at that place (`weight` -> `kernel`, `scale` or `embedding`).
Kernels change layout: linear (out, in) -> (in, out); conv OIHW -> HWIO.
"""

import re
from typing import Any, Callable, Dict, Iterable, Mapping, Tuple

import numpy as np

from latent_diffusion_jax.core.errors import InputFileError
from flax import traverse_util

# Flax module names that end in _<digit> without being list items in PyTorch.
_NOT_LIST_ITEMS = frozenset({"linear_1", "linear_2"})
_LIST_ITEM = re.compile(r"^(.*)_(\d+)$")


class WeightImportError(InputFileError):
  """Raised when a PyTorch state dict does not fit the Flax model it is loaded into."""


def torch_key_to_flax_path(key: str) -> Tuple[str, ...]:
  """Module path of a PyTorch key with list indices folded in; the leaf keeps its PyTorch name."""
  parts = key.split(".")
  path = []
  for part in parts:
    if part.isdigit() and path:
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(part)
  return tuple(path)


def flax_path_to_torch_key(path: Tuple[str, ...], leaf: str) -> str:
  """Inverse of `torch_key_to_flax_path` for module paths, with the PyTorch leaf name `leaf`."""
  parts = []
  for name in path:
    match = _LIST_ITEM.match(name)
    if match and name not in _NOT_LIST_ITEMS:
      parts.extend(match.groups())
    else:
      parts.append(name)
  return ".".join(parts + [leaf])


def _to_flax_layout(value: np.ndarray, flax_leaf: str) -> np.ndarray:
  if flax_leaf == "kernel":
    if value.ndim == 4:
      return np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 2:
      return value.T
  return value


def _to_torch_layout(value: np.ndarray, flax_leaf: str) -> np.ndarray:
  if flax_leaf == "kernel":
    if value.ndim == 4:
      return np.transpose(value, (3, 2, 0, 1))
    if value.ndim == 2:
      return value.T
  return value


_TORCH_TO_FLAX_LEAF = {"weight": ("kernel", "scale", "embedding"), "bias": ("bias",)}
_FLAX_TO_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _format_problems(title: str, items: Iterable[str], limit: int = 25) -> str:
  items = sorted(items)
  if not items:
    return ""
  shown = "\n    ".join(items[:limit])
  more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
  return f"\n  {title} ({len(items)}):\n    {shown}{more}"


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    reference: Any,
    *,
    what: str = "model",
    rename: Callable[[str], str | None] | None = None,
    dtype: Any = None,
) -> Dict[str, Any]:
  """Converts a PyTorch state dict into a Flax param tree shaped like `reference`.

  Args:
    state_dict: PyTorch key -> numpy array.
    reference: a Flax param tree (arrays or `jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape`) that
      fixes which paths exist and their shapes.
    what: a name for error messages (e.g. the directory loaded from).
    rename: optional PyTorch-key rewrite applied first; returning None drops the key (for buffers
      such as `position_ids` that are no parameters).
    dtype: cast every array to this dtype; default keeps each reference leaf's dtype.

  Returns:
    A nested dict of numpy arrays with exactly the reference's paths.

  Raises:
    WeightImportError: listing missing keys, unexpected keys and shape mismatches together.
  """
  flat_ref = traverse_util.flatten_dict(_unbox(reference))
  out, unexpected, mismatched = {}, [], []
  for key, value in state_dict.items():
    if rename is not None:
      key = rename(key)
      if key is None:
        continue
    path = torch_key_to_flax_path(key)
    module, leaf = path[:-1], path[-1]
    target = None
    for candidate in _TORCH_TO_FLAX_LEAF.get(leaf, (leaf,)):
      if module + (candidate,) in flat_ref:
        target = module + (candidate,)
        break
    if target is None:
      unexpected.append(key)
      continue
    value = _to_flax_layout(np.asarray(value), target[-1])
    ref = flat_ref[target]
    if tuple(value.shape) != tuple(ref.shape):
      mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(ref.shape)} "
                        f"(at {'/'.join(target)}, after layout change)")
      continue
    out[target] = value.astype(dtype if dtype is not None else ref.dtype)
  missing = ["/".join(p) for p in flat_ref if p not in out]
  if missing or unexpected or mismatched:
    raise WeightImportError(
        f"The weights of {what} do not fit the model built from its config:"
        + _format_problems("missing from the checkpoint", missing)
        + _format_problems("unexpected in the checkpoint", unexpected)
        + _format_problems("shape mismatches", mismatched))
  return traverse_util.unflatten_dict(out)


def flax_to_torch(params: Any, *, rename: Callable[[str], str] | None = None) -> Dict[str, np.ndarray]:
  """Converts a Flax param tree to a PyTorch state dict (numpy arrays, PyTorch layouts)."""
  out = {}
  for path, value in traverse_util.flatten_dict(_unbox(params)).items():
    key = flax_path_to_torch_key(path[:-1], _FLAX_TO_TORCH_LEAF.get(path[-1], path[-1]))
    if rename is not None:
      key = rename(key)
    out[key] = np.ascontiguousarray(_to_torch_layout(np.asarray(value), path[-1]))
  return out


def _unbox(tree: Any) -> Any:
  """Strips flax `Partitioned` boxes and FrozenDicts so trees flatten to plain leaves."""
  # local: keeps this module light for tools that only rename keys. parallel.unbox, not flax's,
  # which adds sharding constraints when called under logical axis rules (inside a trainer).
  from flax.core import unfreeze
  from latent_diffusion_jax.core.parallel import unbox
  tree = unbox(tree)
  return unfreeze(tree) if hasattr(tree, "unfreeze") else tree
