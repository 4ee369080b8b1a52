"""The conditioner interface: the LDM paper's tau_theta, one way for any condition into the UNet.

A conditioner reads named batch fields (its `fields`, e.g. "input_ids", "class_labels",
"layout_boxes") and returns a `Conditioning`: the cross-attention context [B, L, D] the UNet's
transformers read and, where the model has one, class labels for the UNet's class embedding
(added to the time embedding; diffusers' `num_class_embeds`). It says whether it trains with the
UNet (its params then live in the train state under `param_key`) or is frozen, and gives its null
input: what caption dropout trains on and what classifier-free guidance guides away from.

Built-in kinds live beside this file (text.py, class_embedder.py, layout.py, precomputed.py); a
user's own conditioner is a `Conditioner` (or subclass) returned by a factory registered with
`registry.register` (see docs/CONDITIONING.md).
"""

import dataclasses
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion_jax.core.errors import UserInputError

Inputs = Mapping[str, Any]


class Conditioning(NamedTuple):
  """What the UNet consumes: context [B, L, D] and optional class labels [B] (int32)."""
  context: jnp.ndarray
  class_labels: Optional[jnp.ndarray] = None


@dataclasses.dataclass(frozen=True)
class Conditioner:
  """A condition encoder and its contract with data, training and sampling.

  Hashable (it is part of a jitted sampler's static key): subclasses hold settings as plain
  fields; a user conditioner passes module-level functions as `null_fn` / `check_fn`.

  Attributes:
    kind: the registered name (config `model.conditioner.kind`).
    module: a Flax module called as `module(**{field: array})` returning a `Conditioning`, or
      None when the fields are the context itself (see `encode`).
    fields: the batch fields read, in the module's argument names.
    trainable: optimized with the UNet (params in the train state under `param_key`); frozen
      conditioners with params arrive as step inputs under the same key.
    context_width: the context's last dimension (must be the UNet's cross_attention_dim).
    param_key: where its params live in the train state / frozen tree.
    null_fn: `null_fn(n) -> {field: host array [n, ...]}`, the null input (user conditioners).
    check_fn: `check_fn(inputs)` raising UserInputError on bad host inputs (user conditioners).
    optional_fields: batch fields read when present instead of `fields` (text: stored "context").
    config: JSON of the settings it was built from (`models.build.conditioner_config`), so
      exports can rebuild it; set by `models.build.build_conditioner`.
  """
  kind: str
  module: Optional[nn.Module]
  fields: Tuple[str, ...]
  trainable: bool
  context_width: int
  param_key: str = "conditioner"
  null_fn: Optional[Callable[[int], Dict[str, np.ndarray]]] = None
  check_fn: Optional[Callable[[Inputs], None]] = None
  optional_fields: Tuple[str, ...] = ()
  config: str = ""

  # -- device side -------------------------------------------------------------------------
  def encode(self, params: Any, inputs: Inputs) -> Conditioning:
    """The UNet's conditioning from a batch's fields (traced inside jit)."""
    missing = [f for f in self.fields if f not in inputs]
    if missing:
      raise UserInputError(f"The {self.kind!r} conditioner reads batch fields {list(self.fields)}; "
                           f"missing {missing} (the batch has {sorted(inputs)}).")
    if self.module is None:
      return Conditioning(jnp.asarray(inputs[self.fields[0]]))
    return self.module.apply({"params": params or {}}, **{f: inputs[f] for f in self.fields})

  def init(self, rng: jax.Array) -> Any:
    """Fresh params (None without a module), from one null example."""
    if self.module is None:
      return None
    example = {f: jnp.asarray(v) for f, v in self.null_inputs(1).items()}
    return self.module.init(rng, **example).get("params", {})

  def has_params(self) -> bool:
    """Whether it has parameters to train or load (a module with at least one)."""
    return self.module is not None and bool(jax.tree.leaves(self.abstract_params()))

  def abstract_params(self) -> Any:
    """Boxed param shapes (nothing allocated)."""
    return jax.eval_shape(self.init, jax.random.key(0))

  # -- host side ---------------------------------------------------------------------------
  def null_inputs(self, n: int) -> Dict[str, np.ndarray]:
    """The null condition for `n` images (caption dropout, classifier-free guidance)."""
    if self.null_fn is None:
      raise UserInputError(f"The {self.kind!r} conditioner has no null input (null_fn); it cannot "
                           "be trained with caption dropout or sampled with guidance.")
    return {k: np.asarray(v) for k, v in self.null_fn(n).items()}

  def check_inputs(self, inputs: Inputs) -> None:
    """Raises UserInputError, naming the field, for inputs this conditioner cannot encode."""
    if self.check_fn is not None:
      self.check_fn(inputs)

  def sampling_inputs(self, n: int, *, class_labels: Optional[Sequence] = None,
                      layouts: Optional[Sequence] = None,
                      conditions: Optional[Inputs] = None) -> Dict[str, np.ndarray]:
    """Host arrays of this conditioner's fields for `n` images, from the sampling arguments.

    The base class takes its fields from `conditions` (field -> [n, ...]); built-in kinds also
    read `class_labels` or `layouts`.
    """
    del class_labels, layouts
    return self._from_conditions(n, conditions)

  def _from_conditions(self, n: int, conditions: Optional[Inputs]) -> Dict[str, np.ndarray]:
    conditions = dict(conditions or {})
    missing = [f for f in self.fields if f not in conditions]
    if missing:
      raise UserInputError(f"The {self.kind!r} conditioner needs conditions {list(self.fields)}; "
                           f"missing {missing}.")
    out = {f: np.asarray(conditions[f]) for f in self.fields}
    for f, v in out.items():
      if v.ndim == 0 or v.shape[0] != n:
        raise UserInputError(f"conditions[{f!r}] must have one row per image ({n}), got shape "
                             f"{v.shape}.")
    self.check_inputs(out)
    return out


def check_batch_fields(conditioner: Conditioner, batch: Inputs) -> None:
  """A training batch lacking a conditioner's fields stops with the fields named."""
  missing = [f for f in conditioner.fields if f not in batch]
  if missing:
    raise UserInputError(
        f"model.conditioner.kind={conditioner.kind!r} reads batch fields {list(conditioner.fields)}, "
        f"but the data yields {sorted(batch)}; missing {missing}.")
