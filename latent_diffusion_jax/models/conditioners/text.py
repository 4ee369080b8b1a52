"""Text conditioners behind the interface: frozen CLIP (Stable Diffusion) and the LDM paper's
jointly trained transformer. Their params keep the train state's "text_encoder" key."""

import dataclasses
from typing import Any, Dict, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.models.conditioners.base import Conditioner, Conditioning, Inputs


@dataclasses.dataclass(frozen=True)
class TextConditioner(Conditioner):
  """Token ids ("input_ids") through a text encoder; stored embeddings ("context") pass as they are.

  `empty_ids` are the empty prompt's token ids (the null input), known once the run's tokenizer is.
  """
  empty_ids: Optional[Tuple[int, ...]] = None
  optional_fields: Tuple[str, ...] = ("context",)

  def encode(self, params: Any, inputs: Inputs) -> Conditioning:
    if "context" in inputs:  # latent shards with stored CLIP embeddings
      return Conditioning(jnp.asarray(inputs["context"]))
    if "input_ids" not in inputs:
      raise UserInputError(f"The {self.kind!r} conditioner reads 'input_ids' (or stored 'context'); "
                           f"the batch has {sorted(inputs)}.")
    return Conditioning(self.module.apply({"params": params}, inputs["input_ids"]).context)

  def init(self, rng) -> Any:
    max_length = len(self.empty_ids) if self.empty_ids else self.module_length()
    return self.module.init(rng, jnp.zeros((1, max_length), jnp.int32))["params"]

  def module_length(self) -> int:
    m = self.module
    return getattr(m, "max_length", None) or getattr(m, "max_position_embeddings")

  def null_inputs(self, n: int) -> Dict[str, np.ndarray]:
    if self.empty_ids is None:
      raise UserInputError("The text conditioner's null input is the empty prompt, which needs the "
                           "run's tokenizer (empty_ids unset).")
    return {"input_ids": np.tile(np.asarray(self.empty_ids, np.int32)[None], (n, 1))}


def text_conditioner(kind: str, module, trainable: bool, width: int,
                     empty_ids: Optional[Tuple[int, ...]] = None) -> TextConditioner:
  return TextConditioner(kind=kind, module=module, fields=("input_ids",), trainable=trainable,
                         context_width=width, param_key="text_encoder",
                         empty_ids=None if empty_ids is None else tuple(int(i) for i in empty_ids))
