"""An evaluation's results as `metrics.json` and a readable `metrics.md` table."""

import json
import os
from typing import Any, Dict

from latent_diffusion_jax.core.errors import StorageError


def flatten(metrics: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
  """{"clip": {"score": 1}} -> {"clip/score": 1}."""
  out = {}
  for key, value in metrics.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flatten(value, name + "/"))
    else:
      out[name] = value
  return out


def _format(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
  return str(value)


def markdown(metrics: Dict[str, Any], settings: Dict[str, Any]) -> str:
  lines = ["| metric | value |", "|---|---|"]
  lines += [f"| {k} | {_format(v)} |" for k, v in flatten(metrics).items()]
  lines += ["", "| setting | value |", "|---|---|"]
  lines += [f"| {k} | {_format(v)} |" for k, v in flatten(settings).items()]
  return "\n".join(lines) + "\n"


def write_report(out_dir: str, metrics: Dict[str, Any], settings: Dict[str, Any]) -> Dict[str, str]:
  """Writes `<out_dir>/metrics.json` ({"metrics", "settings"}) and `<out_dir>/metrics.md`."""
  paths = {"json": os.path.join(out_dir, "metrics.json"), "md": os.path.join(out_dir, "metrics.md")}
  try:
    os.makedirs(out_dir, exist_ok=True)
    with open(paths["json"], "w") as f:
      json.dump({"metrics": metrics, "settings": settings}, f, indent=1, sort_keys=True)
    with open(paths["md"], "w") as f:
      f.write(markdown(metrics, settings))
  except OSError as error:
    raise StorageError(f"cannot write the report into {out_dir}: {error}") from error
  return paths
