"""Building blocks of sweep files: lists of override dicts (`{"optimizer.learning_rate": 1e-4}`).

  product({"optimizer.learning_rate": [1e-4, 3e-4]}, seed=[0, 1])   # 4 points
  zip_({"optimizer.learning_rate": [1e-4, 3e-4], "optimizer.warmup_steps": [10, 50]})  # 2 points
  chain(product(seed=[0, 1]), [{"training.batch_size": 16}])         # 3 points

Each helper takes parts: a mapping of axes (key -> list of values) or an already built list of
points, plus keyword axes for keys without dots (`seed=[0, 1]`). Keys are dotted config paths.
A key set twice in one point is an error, so a product never silently drops a value.
"""

import itertools
from typing import Any, Dict, List, Mapping, Sequence, Union

from latent_diffusion_jax.core.errors import UserInputError

Point = Dict[str, Any]
Part = Union[Mapping[str, Sequence[Any]], Sequence[Mapping[str, Any]]]


def _axis_points(key: str, values: Any) -> List[Point]:
  if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
    raise UserInputError(f"Sweep axis {key!r} needs a list of values, got {values!r}.")
  return [{key: v} for v in values]


def _as_lists(parts: Sequence[Part], axes: Mapping[str, Sequence[Any]]) -> List[List[Point]]:
  """Each part as a list of points; a mapping contributes one list per axis."""
  lists = []
  for part in (*parts, axes):
    if isinstance(part, Mapping):
      lists.extend(_axis_points(k, v) for k, v in part.items())
    elif isinstance(part, Sequence) and not isinstance(part, (str, bytes)):
      if not all(isinstance(p, Mapping) for p in part):
        raise UserInputError(f"A list of sweep points must hold dicts of overrides, got {part!r}.")
      lists.append([dict(p) for p in part])
    else:
      raise UserInputError(f"A sweep part must be a dict of axes or a list of points, got {part!r}.")
  return lists


def _merge(points: Sequence[Point]) -> Point:
  out: Point = {}
  for p in points:
    for k, v in p.items():
      if k in out:
        raise UserInputError(f"Sweep key {k!r} is set twice in one point ({out[k]!r} and {v!r}).")
      out[k] = v
  return out


def product(*parts: Part, **axes: Sequence[Any]) -> List[Point]:
  """Every combination of the parts' values; the first axis varies slowest."""
  return [_merge(combo) for combo in itertools.product(*_as_lists(parts, axes))]


def zip_(*parts: Part, **axes: Sequence[Any]) -> List[Point]:
  """The i-th values of all parts together; every part must have the same length."""
  lists = _as_lists(parts, axes)
  lengths = sorted({len(l) for l in lists})
  if len(lengths) > 1:
    raise UserInputError(f"zip_ needs parts of equal length, got lengths {lengths}.")
  return [_merge(combo) for combo in zip(*lists)]


def chain(*parts: Part) -> List[Point]:
  """The parts' points one after the other (a mapping counts as the product of its axes)."""
  out: List[Point] = []
  for part in parts:
    out.extend(product(part) if isinstance(part, Mapping) else _as_lists([part], {})[0])
  return out
