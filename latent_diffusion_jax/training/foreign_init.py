"""Fine-tuning from weights made elsewhere: `training.init_checkpoint` naming foreign weights.

Any source the one loader reads (artifacts/loader.py) besides our own workdirs, which
`startup.initial_state` restores directly: a diffusers pipeline or model directory, an
original-layout single file (`.ckpt` only with `frozen.allow_pickle`), a native export.

The networks the run trains take the imported values as both params and EMA params; the optimizer
state, step and RNG start fresh. The config must describe the architecture the weights were made
for: every architectural field of each imported module is compared with the module the config
builds, and a difference stops the run naming the config key and the value the weights need.
"""

import dataclasses
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from latent_diffusion_jax.artifacts import loader
from latent_diffusion_jax.core.errors import UserInputError

# Fields that choose how a module computes, not what its weights mean.
_RUNTIME_FIELDS = frozenset({"parent", "name", "dtype", "param_dtype", "attention_impl", "remat",
                             "dropout", "output_layer"})
# Per-level fields a config may give as one int or as one value per level.
_PER_LEVEL_FIELDS = ("num_heads", "head_dim", "transformer_depth")

_CONFIG_KEYS = {"unet": "model.unet", "vae": "model.vae"}


def _normalized(module: nn.Module) -> Dict[str, Any]:
  levels = len(getattr(module, "block_out_channels", ()) or ())
  out = {}
  for field in dataclasses.fields(module):
    if field.name in _RUNTIME_FIELDS:
      continue
    value = getattr(module, field.name)
    if isinstance(value, list):
      value = tuple(value)
    if field.name in _PER_LEVEL_FIELDS and isinstance(value, int) and levels:
      value = (value,) * levels
    out[field.name] = value
  return out


def check_same_architecture(ours: nn.Module, theirs: nn.Module, config_key: str, path: str) -> None:
  """Raises ValueError naming every architectural field where the config and the weights differ."""
  if type(ours) is not type(theirs):
    raise UserInputError(f"{path} holds a {type(theirs).__name__} where {config_key} builds a "
                     f"{type(ours).__name__}.")
  a, b = _normalized(ours), _normalized(theirs)
  diffs = [f"{config_key}.{k}={a[k]!r} but the weights need {b[k]!r}"
           for k in sorted(a) if a[k] != b.get(k)]
  if diffs:
    raise UserInputError(f"The config does not describe the network stored in {path}: "
                     + "; ".join(diffs) + ". Set those keys to the weights' values.")


def import_params(path: str, modules: Dict[str, nn.Module], *,
                  allow_pickle: bool = False) -> Dict[str, Any]:
  """Host params for each of `modules` (name -> the module the config builds) found in `path`.

  The UNet (diffusion) or VAE (autoencoder) must be present; a trainable text encoder the source
  lacks keeps its fresh initialization, with a warning.

  Raises:
    ValueError: an unrecognised source, a missing required network, or an architecture mismatch.
    WeightImportError, PickleRefusedError: from the interop loaders.
  """
  try:
    source = loader.Source(path, allow_pickle=allow_pickle).resolved()
  except ValueError as e:
    raise UserInputError(f"training.init_checkpoint: {e}") from None
  found = loader.load_networks(source, tuple(modules)).networks
  params = {}
  for name, ours in modules.items():
    if name not in found:
      if name == "text_encoder":
        logging.warning("%s holds no text encoder weights; the trainable conditioner starts from "
                        "its random initialization.", path)
        continue
      raise UserInputError(f"training.init_checkpoint={path!r} holds no {name} weights to fine-tune.")
    theirs, values = found[name]
    check_same_architecture(ours, theirs, _config_key(name, ours), path)
    params[name] = values
  logging.info("Imported %s from %s for fine-tuning.", sorted(params), path)
  return params


def _config_key(name: str, module: nn.Module) -> str:
  """The config section that builds network `name` (for error messages)."""
  if name == "text_encoder":
    return "model.text_encoder." + ("clip" if type(module).__name__ == "CLIPTextModel" else "ldm")
  return _CONFIG_KEYS[name]


def place(values: Any, abstract: Any, shardings: Any, what: str) -> Any:
  """Host arrays onto `shardings` (each device gets only its shard), cast to the abstract dtypes.

  Every process calls this with the full host tree; no array passes through one device first.
  """
  flat_values, _ = jax.tree_util.tree_flatten_with_path(values)
  flat_abstract, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  got = {jax.tree_util.keystr(p): v for p, v in flat_values}
  want = {jax.tree_util.keystr(p): a for p, a in flat_abstract}
  missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  mismatched = sorted(f"{k}: {np.shape(got[k])} vs {want[k].shape}" for k in set(got) & set(want)
                      if tuple(np.shape(got[k])) != tuple(want[k].shape))
  if missing or unexpected or mismatched:
    raise UserInputError(f"Imported {what} does not fit the train state: missing {missing[:10]}, "
                     f"unexpected {unexpected[:10]}, shape mismatches {mismatched[:10]}.")
  shard_leaves = jax.tree.leaves(shardings)

  def put(key: str, sharding: Any) -> jax.Array:
    host = np.asarray(got[key], dtype=want[key].dtype)
    # A copy per shard: on CPU a jax.Array may alias the numpy buffer it was made from, and
    # params and EMA (both made from `values`) must not share memory in a donated state.
    return jax.make_array_from_callback(host.shape, sharding, lambda index: np.array(host[index]))

  return treedef.unflatten([put(jax.tree_util.keystr(p), s)
                            for (p, _), s in zip(flat_abstract, shard_leaves)])


def replace_params(state: Any, abstract: Any, shardings: Any, imported: Dict[str, Any],
                   path: Optional[str] = None) -> Any:
  """`state` with params (and EMA params, as separate buffers) of each imported network replaced."""
  params, ema = dict(state.params), state.ema_params
  ema = dict(ema) if ema is not None else None
  for name, values in imported.items():
    what = f"{name} from {path}" if path else name
    params[name] = place(values, abstract.params[name], shardings.params[name], what)
    if ema is not None:
      ema[name] = place(values, abstract.ema_params[name], shardings.ema_params[name], what)
  return state.replace(params=params, ema_params=ema)
