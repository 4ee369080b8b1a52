"""Conditioners by name: the built-in kinds and those users register from their own files.

  # my_conditioner.py, named by --config.model.conditioner.module=my_conditioner.py
  from latent_diffusion_jax.models.conditioners import registry
  @registry.register("my_kind")
  def build(model_cfg):            # the run's config.model
    return Conditioner(kind="my_kind", module=MyModule(...), fields=("my_field",), ...)

The module named by `model.conditioner.module` is imported before any conditioner is built (by
training, sampling and export alike), so registering needs no edit of the package.
"""

import importlib
import importlib.util
import os
import sys
from typing import Callable, Dict

from latent_diffusion_jax.core.errors import UserInputError

BUILT_IN = ("clip", "ldm_transformer", "class", "layout", "precomputed", "none")
_FACTORIES: Dict[str, Callable] = {}


def register(name: str, factory: Callable = None):
  """Registers `factory(model_cfg) -> Conditioner` under `name`; usable as a decorator."""
  if name in BUILT_IN:
    raise UserInputError(f"Conditioner name {name!r} is built in; choose another name.")

  def add(f):
    _FACTORIES[name] = f
    return f

  return add(factory) if factory is not None else add


def registered(name: str) -> Callable:
  if name not in _FACTORIES:
    raise UserInputError(
        f"Unknown model.conditioner.kind {name!r}; valid: {', '.join(BUILT_IN + tuple(sorted(_FACTORIES)))}"
        " (a conditioner of your own registers from the file or module named by "
        "model.conditioner.module).")
  return _FACTORIES[name]


def import_user_module(spec: str) -> None:
  """Imports `model.conditioner.module`: a Python file path or a dotted module name."""
  if not spec:
    return
  try:
    if spec.endswith(".py"):
      path = os.path.abspath(spec)
      if not os.path.isfile(path):
        raise UserInputError(f"model.conditioner.module={spec!r}: no such file.")
      name = "ldj_user_conditioner_" + os.path.splitext(os.path.basename(path))[0]
      if name in sys.modules and getattr(sys.modules[name], "__file__", None) == path:
        return
      module_spec = importlib.util.spec_from_file_location(name, path)
      module = importlib.util.module_from_spec(module_spec)
      sys.modules[name] = module
      module_spec.loader.exec_module(module)
    else:
      importlib.import_module(spec)
  except UserInputError:
    raise
  except ImportError as e:
    raise UserInputError(f"model.conditioner.module={spec!r} cannot be imported: {e}") from e
