"""Layouts as conditioning: the LDM paper's layout-to-image model.

Each box becomes one token, the sum of its class's embedding and the embeddings of its four
coordinates quantized to `num_bins` bins (a table per coordinate), and a trained transformer turns
the boxes into the cross-attention context [B, max_boxes, D]. Padding boxes (class -1) and the
null layout of classifier-free guidance use the extra class index `num_classes` and bin 0.

A layout for sampling is a list of objects, each a (box, class) pair or a mapping
{"box": [x0, y0, x1, y1], "class": index or name}, optionally wrapped as {"objects": [...]}; box
coordinates are fractions of the image width/height in [0, 1], x to the right, y down.
"""

import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.models import layers
from latent_diffusion_jax.models.conditioners.base import Conditioner, Conditioning, Inputs
from latent_diffusion_jax.models.text_encoders import LDMBlock

class LayoutEncoder(nn.Module):
  """(layout_boxes [B, M, 4] in [0, 1], layout_classes [B, M], -1 = none) -> Conditioning."""
  num_classes: int
  max_boxes: int
  num_bins: int
  width: int
  depth: int
  heads: int
  head_dim: int
  context_width: int
  attention_impl: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, layout_boxes: jnp.ndarray, layout_classes: jnp.ndarray) -> Conditioning:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    classes = layout_classes.astype(jnp.int32)
    empty = classes < 0
    classes = jnp.where(empty, self.num_classes, classes)
    bins = jnp.clip(jnp.floor(layout_boxes.astype(jnp.float32) * self.num_bins), 0,
                    self.num_bins - 1).astype(jnp.int32)
    bins = jnp.where(empty[..., None], 0, bins)
    # One token per box: its class embedding plus one embedding per quantized coordinate (a table
    # per coordinate: x0, y0, x1, y1), so each token carries what and where together and the
    # UNet's cross-attention reads a box from one token. Boxes form a set: no slot embedding.
    tok = layers.embed(self.num_classes + 1, self.width, axes=("vocab", "embed"),
                       name="class_embedding", stddev=1.0, **kw)(classes)
    offsets = jnp.arange(4, dtype=jnp.int32) * self.num_bins
    coords = layers.embed(4 * self.num_bins, self.width, axes=("vocab", "embed"),
                          name="coordinate_embedding", stddev=0.5, **kw)(bins + offsets)
    x = tok + coords.sum(axis=2)  # [B, M, W]
    for i in range(self.depth):
      x = LDMBlock(self.heads, self.head_dim, 4.0, self.attention_impl, name=f"layers_{i}", **kw)(x)
    x = layers.layer_norm(1e-5, name="final_layer_norm", **kw)(x)
    if self.context_width != self.width:
      x = layers.dense(self.context_width, ("embed", "mlp"), name="proj_out", **kw)(x)
    return Conditioning(x)


def _class_of(value, names: Tuple[str, ...], where: str) -> int:
  if isinstance(value, str) and not value.lstrip("-").isdigit():
    if value not in names:
      valid = ", ".join(names) or "(none: the model has no class_names; give indices)"
      raise UserInputError(f"{where}: unknown class name {value!r}; valid: {valid}.")
    return names.index(value)
  return int(value)


def _objects(layout) -> list:
  if isinstance(layout, dict):
    if "objects" not in layout:
      raise UserInputError(f"A layout mapping needs an 'objects' list, got keys {sorted(layout)}.")
    layout = layout["objects"]
  return list(layout)


def parse_layouts(layouts: Sequence, max_boxes: int, num_classes: int,
                  class_names: Tuple[str, ...] = ()) -> Tuple[np.ndarray, np.ndarray]:
  """Layouts (see the module docstring) -> (boxes [n, max_boxes, 4], classes [n, max_boxes])."""
  n = len(layouts)
  boxes = np.zeros((n, max_boxes, 4), np.float32)
  classes = np.full((n, max_boxes), -1, np.int32)
  for i, layout in enumerate(layouts):
    objects = _objects(layout)
    if len(objects) > max_boxes:
      raise UserInputError(f"layout {i} has {len(objects)} boxes; this model takes at most "
                           f"{max_boxes} (model.conditioner.layout.max_boxes).")
    for j, obj in enumerate(objects):
      where = f"layout {i}, box {j}"
      if isinstance(obj, dict):
        if "box" not in obj or "class" not in obj:
          raise UserInputError(f"{where}: an object needs 'box' and 'class', got {sorted(obj)}.")
        box, cls = obj["box"], obj["class"]
      else:
        box, cls = obj
      box = np.asarray(box, np.float32).reshape(-1)
      if box.shape != (4,):
        raise UserInputError(f"{where}: a box is [x0, y0, x1, y1], got {box.tolist()}.")
      boxes[i, j], classes[i, j] = box, _class_of(cls, class_names, where)
  check_layout_arrays(boxes, classes, max_boxes, num_classes)
  return boxes, classes


def check_layout_arrays(boxes: np.ndarray, classes: np.ndarray, max_boxes: int,
                        num_classes: int) -> None:
  """Raises UserInputError naming the layout and box that is not a valid condition."""
  boxes, classes = np.asarray(boxes), np.asarray(classes)
  if boxes.ndim != 3 or boxes.shape[-1] != 4 or classes.shape != boxes.shape[:2]:
    raise UserInputError(f"layout_boxes must be [n, M, 4] and layout_classes [n, M]; got "
                         f"{boxes.shape} and {classes.shape}.")
  if boxes.shape[1] > max_boxes:
    raise UserInputError(f"layouts have {boxes.shape[1]} box slots; this model takes at most "
                         f"{max_boxes} (model.conditioner.layout.max_boxes).")
  for i, j in zip(*np.nonzero(classes >= 0)):
    box, where = boxes[i, j], f"layout {i}, box {j}"
    if classes[i, j] >= num_classes:
      raise UserInputError(f"{where}: class {int(classes[i, j])} is out of range [0, {num_classes}).")
    if not np.all(np.isfinite(box)) or box.min() < 0 or box.max() > 1:
      raise UserInputError(f"{where}: box {box.tolist()} must lie in [0, 1] (fractions of the image).")
    if box[0] > box[2] or box[1] > box[3]:
      raise UserInputError(f"{where}: box {box.tolist()} has x0 > x1 or y0 > y1; boxes are "
                           "[x0, y0, x1, y1] with the top-left corner first.")
  bad = classes[(classes < -1)]
  if bad.size:
    raise UserInputError(f"layout_classes must be -1 (no box) or a class index; got {bad.tolist()}.")


@dataclasses.dataclass(frozen=True)
class LayoutConditioner(Conditioner):
  num_classes: int = 0
  max_boxes: int = 3
  class_names: Tuple[str, ...] = ()

  def null_inputs(self, n: int) -> Dict[str, np.ndarray]:
    return {"layout_boxes": np.zeros((n, self.max_boxes, 4), np.float32),
            "layout_classes": np.full((n, self.max_boxes), -1, np.int32)}

  def check_inputs(self, inputs: Inputs) -> None:
    check_layout_arrays(inputs["layout_boxes"], inputs["layout_classes"], self.max_boxes,
                        self.num_classes)

  def sampling_inputs(self, n: int, *, class_labels=None, layouts: Optional[Sequence] = None,
                      conditions: Optional[Inputs] = None) -> Dict[str, np.ndarray]:
    if class_labels is not None:
      raise UserInputError("This is a layout-to-image model; it takes layouts, not class_labels.")
    if layouts is None:
      if conditions and "layout_boxes" in conditions:
        return self._from_conditions(n, conditions)
      raise UserInputError("This is a layout-to-image model: pass layouts (boxes with classes).")
    layouts = list(layouts)
    if len(layouts) != n:
      raise UserInputError(f"Got {len(layouts)} layouts for {n} images.")
    boxes, classes = parse_layouts(layouts, self.max_boxes, self.num_classes, self.class_names)
    return {"layout_boxes": boxes, "layout_classes": classes}


def layout_conditioner(cfg, num_classes: int, class_names: Sequence[str], context_width: int,
                       attention_impl: str, dtype, param_dtype) -> LayoutConditioner:
  """`cfg`: model.conditioner.layout (max_boxes, num_bins, width, depth, heads, head_dim)."""
  if num_classes < 1:
    raise UserInputError(f"model.conditioner.num_classes must be >= 1 for kind 'layout', got "
                         f"{num_classes}.")
  if cfg.max_boxes < 1 or cfg.num_bins < 2:
    raise UserInputError(f"model.conditioner.layout needs max_boxes >= 1 and num_bins >= 2, got "
                         f"{cfg.max_boxes} and {cfg.num_bins}.")
  module = LayoutEncoder(num_classes, cfg.max_boxes, cfg.num_bins, cfg.width, cfg.depth, cfg.heads,
                         cfg.head_dim, context_width, attention_impl, dtype, param_dtype)
  return LayoutConditioner(kind="layout", module=module,
                           fields=("layout_boxes", "layout_classes"), trainable=True,
                           context_width=context_width, num_classes=int(num_classes),
                           max_boxes=int(cfg.max_boxes), class_names=tuple(class_names))
