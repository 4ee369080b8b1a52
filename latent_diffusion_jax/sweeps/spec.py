"""Sweep files: loading, and checking every point against the base config before anything runs.

A sweep file (configs/sweeps/<name>.py) names its base config and returns its points:

  BASE_CONFIG = "configs/shapes_autoencoder.py:tiny"   # as train.py's --config takes it

  def sweep():
    return points.product({"optimizer.learning_rate": [1e-4, 3e-4, 1e-3]})

`sweep` may take the text after a colon (`--sweep configs/sweeps/x.py:small` calls sweep("small")).
A relative BASE_CONFIG is looked up from the current directory, then from the sweep file's directory
and its parents (so configs/sweeps/x.py may say "configs/y.py" or "../y.py").

Each point becomes `--config.<key>=<value>` flags; `load_sweep` parses them exactly as train.py
does (ml_collections.config_flags), so a point that loads here is a command that runs.
"""

import copy
import dataclasses
import difflib
import importlib.util
import os
import re
from typing import Any, Dict, List, Sequence, Tuple

import ml_collections as mc
from absl import flags
from ml_collections import config_flags

from latent_diffusion_jax.core.config import load_config_file
from latent_diffusion_jax.core.errors import InputFileError, MissingInputError, UserInputError


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep: its position, overrides, readable name and resolved config."""
  index: int
  overrides: Dict[str, Any]
  name: str
  config: mc.ConfigDict = dataclasses.field(compare=False, repr=False)

  @property
  def dirname(self) -> str:
    """`<index>-<name>`: the point's workdir under the sweep root."""
    return f"{self.index}-{self.name}"

  def flags(self) -> List[str]:
    """The train.py flags of the overrides, one `--config.<key>=<value>` each."""
    return [f"--config.{k}={format_value(v)}" for k, v in self.overrides.items()]


@dataclasses.dataclass(frozen=True)
class Sweep:
  path: str
  # As written in the sweep file: what launch files pass to train.py on the cluster.
  base_config: str
  # Resolved to an existing file here: what local runs pass.
  local_base_config: str
  points: Tuple[Point, ...]

  @property
  def name(self) -> str:
    return os.path.splitext(os.path.basename(self.path))[0]


def format_value(value: Any) -> str:
  """A value as config_flags parses it back: Python literals for tuples, raw text for strings."""
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  if isinstance(value, float):
    return repr(value)
  return str(value)


def _short(value: Any) -> str:
  text = format_value(value)
  return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "x"


def point_name(overrides: Dict[str, Any], limit: int = 60) -> str:
  """A short readable name: the last part of each key with its value (`learning_rate=0.0001`)."""
  if not overrides:
    return "base"
  name = "_".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in overrides.items())
  return name[:limit].rstrip("_")


def _flat_keys(config: mc.ConfigDict, prefix: str = "") -> List[str]:
  keys = []
  for k, v in config.items():
    keys.append(prefix + k)
    if isinstance(v, mc.ConfigDict):
      keys.extend(_flat_keys(v, f"{prefix}{k}."))
  return keys


def _describe(index: int, overrides: Dict[str, Any]) -> str:
  return f"sweep point {index} ({', '.join(f'{k}={v!r}' for k, v in overrides.items()) or 'no overrides'})"


def _check_types(base: mc.ConfigDict, index: int, overrides: Dict[str, Any]) -> None:
  """Unknown keys and values of the wrong Python type, named with the point, before any parsing."""
  config = copy.deepcopy(base)
  for key, value in overrides.items():
    parent, parts = config, key.split(".")
    for i, part in enumerate(parts):
      if not isinstance(parent, mc.ConfigDict) or part not in parent:
        close = difflib.get_close_matches(key, _flat_keys(base), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "."
        raise UserInputError(f"{_describe(index, overrides)}: the base config has no key {key!r}{hint}")
      if i < len(parts) - 1:
        parent = parent[part]
    current = parent[parts[-1]]
    if isinstance(current, mc.ConfigDict):
      raise UserInputError(f"{_describe(index, overrides)}: {key!r} is a section of the config; "
                           "override its fields one by one.")
    try:
      parent[parts[-1]] = tuple(value) if isinstance(value, list) else value
    except (TypeError, ValueError) as e:
      raise UserInputError(
          f"{_describe(index, overrides)}: {key}={value!r} has type {type(value).__name__}, but the "
          f"base config's {key} is {type(current).__name__} ({current!r}): {e}") from e


def parse_flags(base_config: str, flag_list: Sequence[str]) -> mc.ConfigDict:
  """The config train.py would run with `--config=base_config *flag_list` (absl's own parsing)."""
  argv = ["train.py", f"--config={base_config}", *flag_list]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def resolve_base_config(base_config: str, sweep_path: str) -> str:
  """The base config's path here (keeping its `:arg`), or an error naming the places tried."""
  path, colon, arg = base_config.partition(":")
  if os.path.isabs(path):
    candidates = [path]
  else:
    here = os.path.dirname(os.path.abspath(sweep_path))
    candidates = [path, *(os.path.join(d, path) for d in
                          (here, os.path.dirname(here), os.path.dirname(os.path.dirname(here))))]
  for candidate in candidates:
    if os.path.isfile(candidate):
      return os.path.abspath(candidate) + colon + arg
  raise MissingInputError(f"{sweep_path}: BASE_CONFIG {base_config!r} not found; tried "
                          f"{', '.join(sorted(set(os.path.abspath(c) for c in candidates)))}.")


def _load_module(path: str):
  if not os.path.isfile(path):
    raise MissingInputError(f"No sweep file at {path!r}.")
  spec = importlib.util.spec_from_file_location(
      "sweep_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0]), path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sweep(path_and_arg: str) -> Sweep:
  """Loads `configs/sweeps/x.py[:arg]` and checks every point (keys, value types, flag parsing).

  Raises:
    UserInputError: naming the point (index and overrides) and the key at fault.
  """
  path, _, arg = path_and_arg.partition(":")
  module = _load_module(path)
  base_config = getattr(module, "BASE_CONFIG", None)
  if not isinstance(base_config, str) or not base_config:
    raise InputFileError(f"{path} sets no BASE_CONFIG (e.g. BASE_CONFIG = "
                         "\"configs/shapes_autoencoder.py:tiny\").")
  if not callable(getattr(module, "sweep", None)):
    raise InputFileError(f"{path} defines no sweep() function returning the points.")
  overrides_list = module.sweep(arg) if arg else module.sweep()
  if not isinstance(overrides_list, (list, tuple)) or not overrides_list:
    raise InputFileError(f"{path}: sweep() must return a non-empty list of override dicts, got "
                         f"{overrides_list!r}.")
  local_base = resolve_base_config(base_config, path)
  base = load_config_file(local_base)
  points = []
  for index, overrides in enumerate(overrides_list):
    if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
      raise InputFileError(f"{path}: sweep point {index} is not a dict of overrides: {overrides!r}.")
    overrides = dict(overrides)
    _check_types(base, index, overrides)
    point = Point(index, overrides, point_name(overrides), mc.ConfigDict())
    try:
      config = parse_flags(local_base, point.flags())
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
      raise UserInputError(f"{_describe(index, overrides)}: train.py would refuse its flags "
                           f"{point.flags()}: {e}") from e
    points.append(dataclasses.replace(point, config=config))
  return Sweep(path=path, base_config=base_config, local_base_config=local_base,
               points=tuple(points))
