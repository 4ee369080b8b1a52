"""Non-text conditions for sample.py: class labels, layouts (JSON) and stored embeddings.

  python sample.py --checkpoint runs/class_ldm --class_label "red circle" --class_label 4
  python sample.py --checkpoint runs/layout_ldm --layout layouts.json
  python sample.py --checkpoint runs/layout_ldm \
      --layout '{"objects": [{"box": [0.1, 0.1, 0.45, 0.45], "class": "red circle"}]}'
  python sample.py --checkpoint runs/audio_ldm --embeddings clips.npy      # [n, L, D] or [L, D]

A layout JSON is one layout ({"objects": [...]} or a list of objects) or a list of layouts; each
object is {"box": [x0, y0, x1, y1], "class": name or index}, boxes as fractions of the image.
"""

import json
import os
from typing import Any, List, Sequence

import numpy as np

from latent_diffusion_jax.core.errors import InputFileError, UserInputError


def _is_layout(value: Any) -> bool:
  """One layout: {"objects": [...]} or a list of objects (each a dict with "box", or a pair)."""
  if isinstance(value, dict):
    return "objects" in value
  if isinstance(value, list):
    return all(isinstance(o, dict) and "box" in o for o in value)
  return False


def read_layouts(specs: Sequence[str]) -> List[Any]:
  """Layouts from --layout values, each inline JSON or a JSON file (one layout or a list)."""
  out = []
  for spec in specs:
    text, where = spec, "--layout"
    if not spec.lstrip().startswith(("{", "[")):
      if not os.path.isfile(spec):
        raise InputFileError(f"--layout {spec!r} is neither JSON nor an existing file.")
      with open(spec, encoding="utf-8") as f:
        text, where = f.read(), spec
    try:
      value = json.loads(text)
    except json.JSONDecodeError as e:
      raise UserInputError(f"{where}: not valid JSON ({e}).") from e
    if _is_layout(value):
      out.append(value)
    elif isinstance(value, list) and all(_is_layout(v) for v in value):
      out.extend(value)
    else:
      raise UserInputError(f"{where}: expected a layout {{\"objects\": [{{\"box\": [x0, y0, x1, y1], "
                           "\"class\": ...}}, ...]}} or a list of layouts.")
  return out


def read_embeddings(path: str) -> np.ndarray:
  """[n, L, D] float32 embeddings from a .npy file ([L, D] is one image's)."""
  if not os.path.isfile(path):
    raise InputFileError(f"--embeddings {path!r} does not exist.")
  try:
    e = np.load(path, allow_pickle=False)
  except ValueError as err:
    raise InputFileError(f"--embeddings {path!r} is not a .npy array file ({err}).") from err
  if e.ndim == 2:
    e = e[None]
  if e.ndim != 3:
    raise UserInputError(f"--embeddings {path!r} must hold [n, L, D] or [L, D], got shape {e.shape}.")
  return e.astype(np.float32)


def layout_caption(layout: Any) -> str:
  """A short description of a layout, for file names: "red circle, blue square"."""
  objects = layout["objects"] if isinstance(layout, dict) else layout
  names = [str(o["class"]) if isinstance(o, dict) else str(o[1]) for o in objects]
  return "layout " + (", ".join(names) if names else "empty")


def repeat(items: Sequence[Any], times: int) -> list:
  """Each item `times` times, consecutively (images per condition)."""
  return [item for item in items for _ in range(times)]
