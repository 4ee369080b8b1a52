"""Class labels as conditioning: the LDM paper's class-conditional ImageNet models.

A learned embedding per class is the cross-attention context (one token), and optionally the
label also goes to the UNet's own class embedding, added to the time embedding (diffusers'
`num_class_embeds`, exportable). Index `num_classes` is the null class of classifier-free
guidance, trained by label dropout.
"""

import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.models import layers
from latent_diffusion_jax.models.conditioners.base import Conditioner, Conditioning, Inputs


class ClassEmbedder(nn.Module):
  """class_labels [B] in [0, num_classes] (the last is null) -> Conditioning."""
  num_classes: int
  width: int
  context: bool = True
  unet_labels: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, class_labels: jnp.ndarray) -> Conditioning:
    labels = class_labels.astype(jnp.int32)
    if self.context:
      # Unit scale, as the paper's ClassEmbedder (torch nn.Embedding, N(0, 1)): at the usual
      # 0.02 the one context token starts 50x below the keys cross-attention reads elsewhere,
      # and a 700-step run left it at std 0.034 with the class barely used.
      ctx = layers.embed(self.num_classes + 1, self.width, axes=("vocab", "embed"),
                         name="embedding", dtype=self.dtype, param_dtype=self.param_dtype,
                         stddev=1.0)(labels)
      ctx = ctx[:, None, :]
    else:  # the class reaches the UNet only through its class embedding
      ctx = jnp.zeros((labels.shape[0], 1, self.width), self.dtype)
    return Conditioning(ctx, labels if self.unet_labels else None)


def _label_list(class_labels, names: Tuple[str, ...]) -> np.ndarray:
  out = []
  for label in class_labels:
    if isinstance(label, str) and not label.lstrip("-").isdigit():
      if label not in names:
        valid = ", ".join(names) or "(none: the model has no class_names; give indices)"
        raise UserInputError(f"Unknown class name {label!r}; valid: {valid}.")
      out.append(names.index(label))
    else:
      out.append(int(label))
  return np.asarray(out, np.int32)


@dataclasses.dataclass(frozen=True)
class ClassConditioner(Conditioner):
  num_classes: int = 0
  class_names: Tuple[str, ...] = ()

  def null_inputs(self, n: int) -> Dict[str, np.ndarray]:
    return {"class_labels": np.full((n,), self.num_classes, np.int32)}

  def check_inputs(self, inputs: Inputs) -> None:
    labels = np.asarray(inputs["class_labels"])
    bad = labels[(labels < 0) | (labels >= self.num_classes)] if labels.size else labels
    if bad.size:
      raise UserInputError(f"class_labels must lie in [0, {self.num_classes}) "
                           f"(model.conditioner.num_classes={self.num_classes}); got {bad.tolist()}.")

  def sampling_inputs(self, n: int, *, class_labels: Optional[Sequence] = None, layouts=None,
                      conditions: Optional[Inputs] = None) -> Dict[str, np.ndarray]:
    if layouts is not None:
      raise UserInputError("This model is class-conditional; it takes class_labels, not layouts.")
    if class_labels is None:
      if conditions and "class_labels" in conditions:
        return self._from_conditions(n, conditions)
      raise UserInputError(f"This model is class-conditional ({self.num_classes} classes): pass "
                           "class_labels (indices or names).")
    labels = _label_list(list(np.asarray(class_labels, object).reshape(-1)), self.class_names)
    if len(labels) != n:
      raise UserInputError(f"Got {len(labels)} class_labels for {n} images.")
    self.check_inputs({"class_labels": labels})
    return {"class_labels": labels}


def class_conditioner(num_classes: int, width: int, *, context: bool = True,
                      unet_labels: bool = False, class_names: Sequence[str] = (),
                      dtype=jnp.float32, param_dtype=jnp.float32) -> ClassConditioner:
  if num_classes < 1:
    raise UserInputError(f"model.conditioner.num_classes must be >= 1 for kind 'class', got "
                         f"{num_classes}.")
  if class_names and len(class_names) != num_classes:
    raise UserInputError(f"model.conditioner.class_names has {len(class_names)} names for "
                         f"num_classes={num_classes}.")
  if not context and not unet_labels:
    raise UserInputError("A class conditioner without context needs "
                         "model.conditioner.use_unet_class_embedding=True.")
  module = ClassEmbedder(num_classes, width, context, unet_labels, dtype, param_dtype)
  return ClassConditioner(kind="class", module=module, fields=("class_labels",), trainable=True,
                          context_width=width, num_classes=int(num_classes),
                          class_names=tuple(class_names))
