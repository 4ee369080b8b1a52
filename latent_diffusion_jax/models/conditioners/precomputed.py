"""Precomputed embeddings as conditioning: any external encoder's output stored with the data.

A speech or audio model, a different text model, an image encoder: its [L, D] output per example
is written next to the latents (`encode.embedding_field`) and read as the batch field
"embeddings", which is the cross-attention context itself. The seed's audio -> text -> image
use is this: encode the audio's transcript (or the audio) with that model offline, store, train.
The null input is all zeros.
"""

import dataclasses
from typing import Dict, Optional

import numpy as np

from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.models.conditioners.base import Conditioner, Inputs


@dataclasses.dataclass(frozen=True)
class PrecomputedConditioner(Conditioner):
  length: int = 77

  def null_inputs(self, n: int) -> Dict[str, np.ndarray]:
    return {"embeddings": np.zeros((n, self.length, self.context_width), np.float32)}

  def check_inputs(self, inputs: Inputs) -> None:
    e = np.asarray(inputs["embeddings"])
    if e.ndim != 3 or e.shape[-1] != self.context_width:
      raise UserInputError(
          f"embeddings must be [n, L, {self.context_width}] (model.conditioner.precomputed.width = "
          f"the UNet's cross_attention_dim); got shape {e.shape}.")
    if e.shape[1] != self.length:
      raise UserInputError(f"embeddings have {e.shape[1]} tokens; the model was trained on "
                           f"{self.length} (model.conditioner.precomputed.length).")
    if not np.all(np.isfinite(e)):
      raise UserInputError("embeddings contain NaN or infinite values.")

  def sampling_inputs(self, n: int, *, class_labels=None, layouts=None,
                      conditions: Optional[Inputs] = None) -> Dict[str, np.ndarray]:
    if class_labels is not None or layouts is not None:
      raise UserInputError("This model is conditioned on precomputed embeddings: pass "
                           "conditions={'embeddings': [n, L, D]}.")
    out = self._from_conditions(n, conditions)
    out["embeddings"] = out["embeddings"].astype(np.float32)
    return out


def precomputed_conditioner(width: int, length: int, context_width: int) -> PrecomputedConditioner:
  if width != context_width:
    raise UserInputError(f"model.conditioner.precomputed.width={width} must equal the UNet's "
                         f"cross_attention_dim={context_width}: the stored embeddings are its context.")
  return PrecomputedConditioner(kind="precomputed", module=None, fields=("embeddings",),
                                trainable=False, context_width=int(width), length=int(length))
