"""The CLIP feature network of the CLIP score: image and caption embeddings, run sharded.

  scorer = load_clip("/weights/clip-vit-large-patch14")                      # transformers
  scorer = load_clip("/weights/open_clip_pytorch_model.bin", model_name="ViT-H-14",
                     allow_pickle=True)                                       # open_clip (MLPerf)
  result = scorer.score(images_uint8, captions)     # ClipScore(cosine, torchmetrics, clipped, count)

The image side is a `FeatureNet` named "clip" whose apply function preprocesses as CLIP does
(clip_preprocess.py) and embeds; any image size goes in. Embeddings are unnormalized, as
transformers' `get_image_features`/`get_text_features` and open_clip's `encode_image`/`encode_text`
return them; the metric normalizes.
"""

import dataclasses
import os
from typing import Any, Optional, Sequence

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from latent_diffusion_jax.core.errors import MissingInputError, UserInputError
from latent_diffusion_jax.data.tokenizers import load_tokenizer
from latent_diffusion_jax.evaluation.feature_nets.base import FeatureNet, run_sharded
from latent_diffusion_jax.evaluation.feature_nets.clip_preprocess import clip_preprocess
from latent_diffusion_jax.evaluation.feature_nets.clip_tokenizer import (
    clean_caption, find_tokenizer_dir, open_clip_tokenizer)
from latent_diffusion_jax.evaluation.feature_nets.clip_weights import (
    KINDS, ClipWeights, detect_kind, load_open_clip, load_transformers_clip, open_clip_bpe_path)
from latent_diffusion_jax.evaluation.metrics.clip_score import ClipScore, clip_score


def clip_image_net(weights: ClipWeights) -> FeatureNet:
  """FeatureNet "clip": images [N, H, W, 3] in [0, 1] -> {"features": [N, projection_dim]}."""
  # The closure holds no params: jitted functions stay cached (base._jitted) after a scorer is gone.
  vision, mean, std, crop_rounding = weights.vision, weights.mean, weights.std, weights.crop_rounding

  def apply_fn(params, images):
    pixels = clip_preprocess(images, vision.image_size, mean=mean, std=std,
                             crop_rounding=crop_rounding)
    return {"features": vision.apply({"params": params}, pixels.astype(vision.dtype))}

  return FeatureNet("clip", vision.projection_dim, apply_fn, weights.vision_params)


@dataclasses.dataclass(frozen=True)
class ClipScorer:
  """CLIP embeddings of images and captions from one model.

  Attributes:
    weights: the converted towers and preprocessing constants.
    image_net: the image side as a FeatureNet ("clip").
    tokenizer: a transformers CLIP tokenizer.
    clean_captions: apply open_clip's caption cleaning before tokenizing (open_clip weights).
    pad_id: the id written after the end-of-text token (open_clip: 0); None keeps the tokenizer's.
  """
  weights: ClipWeights
  image_net: FeatureNet
  tokenizer: Any = dataclasses.field(repr=False)
  clean_captions: bool = False
  pad_id: Optional[int] = None

  @property
  def dim(self) -> int:
    return self.image_net.dim

  @property
  def context_length(self) -> int:
    return self.weights.text.max_position_embeddings

  def image_features(self, images: np.ndarray, *, batch_size: int = 50,
                     mesh: Optional[Mesh] = None) -> np.ndarray:
    """[N, dim] embeddings of uint8 (or [0, 1] float) [N, H, W, 3] images, float64."""
    return self.image_net.extract(images, batch_size=batch_size, mesh=mesh)["features"]

  def tokenize(self, captions: Sequence[str]) -> np.ndarray:
    """int32 [N, context_length]: [SOT] text [EOT] padding, truncated to the context as CLIP does."""
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
      raise UserInputError("captions must be a list of strings")
    if self.clean_captions:
      captions = [clean_caption(c) for c in captions]
    shape = (len(captions), self.context_length)
    tokens = self.tokenizer(list(captions), padding="max_length", truncation=True,
                            max_length=self.context_length, return_tensors="np")
    ids = np.asarray(tokens["input_ids"], np.int32).reshape(shape)
    if self.pad_id is not None:
      ids = np.where(np.asarray(tokens["attention_mask"]).reshape(shape) > 0, ids, self.pad_id)
    return ids.astype(np.int32)

  def text_features(self, captions: Sequence[str], *, batch_size: int = 256,
                    mesh: Optional[Mesh] = None) -> np.ndarray:
    """[N, dim] embeddings of captions, float64."""
    ids = self.tokenize(captions)
    return run_sharded(self._text_apply, self.weights.text_params, ids, batch_size=batch_size,
                       mesh=mesh)["features"] if len(ids) else np.zeros((0, self.dim))

  def score(self, images: np.ndarray, captions: Sequence[str], *, batch_size: int = 50,
            mesh: Optional[Mesh] = None) -> ClipScore:
    """The CLIP score of image i against caption i, every convention."""
    if len(images) != len(captions):
      raise UserInputError(f"{len(images)} images but {len(captions)} captions; one caption per image")
    return clip_score(self.image_features(images, batch_size=batch_size, mesh=mesh),
                      self.text_features(captions, mesh=mesh))

  def __post_init__(self):
    text = self.weights.text

    def text_apply(params, ids):
      return {"features": text.apply({"params": params}, ids)}

    # One function object per scorer, so its jitted computation is reused across calls.
    object.__setattr__(self, "_text_apply", text_apply)


def load_clip(path: str, kind: str = "auto", model_name: Optional[str] = None, *,
              tokenizer_path: Optional[str] = None, dtype: Any = jnp.float32,
              allow_pickle: bool = False) -> ClipScorer:
  """Loads a CLIP model for the CLIP score.

  Args:
    path: a transformers CLIPModel directory, or an open_clip checkpoint file or directory (formats
      in clip_weights.py).
    kind: "auto" (a directory with a CLIPModel config.json is transformers, anything else
      open_clip), "transformers" or "open_clip".
    model_name: open_clip architecture ("ViT-H-14", ...) or the path of its config JSON; not
      needed for transformers or where open_clip_config.json lies beside the weights.
    tokenizer_path: a CLIP tokenizer directory (vocab.json + merges.txt or tokenizer.json). Default:
      `path` (or its tokenizer/ folder) if it holds one; for open_clip weights otherwise the BPE
      vocabulary shipped in the installed open_clip package.
    dtype: parameter and computation dtype (float32 for reference numbers).
    allow_pickle: accept .bin/.pt checkpoints (unpickling can run code stored in the file).

  Returns:
    A `ClipScorer`.
  """
  if kind not in KINDS:
    raise UserInputError(f"kind must be one of {KINDS}, got {kind!r}")
  if kind == "auto":
    kind = detect_kind(path)
  if kind == "transformers":
    weights = load_transformers_clip(path, dtype=dtype, allow_pickle=allow_pickle)
  else:
    weights = load_open_clip(path, model_name, dtype=dtype, allow_pickle=allow_pickle)
  context = weights.text.max_position_embeddings
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  tokenizer_dir = tokenizer_path or find_tokenizer_dir(directory)
  if tokenizer_dir is not None:
    tokenizer = load_tokenizer(tokenizer_dir)
  elif kind == "open_clip" and open_clip_bpe_path() is not None:
    tokenizer = open_clip_tokenizer(open_clip_bpe_path(), context)
  else:
    raise MissingInputError(
        f"No CLIP tokenizer for {path!r}: expected vocab.json and merges.txt (or tokenizer.json) in "
        "that directory or its tokenizer/ folder (CLIPModel.save_pretrained writes none; copy the "
        "model's tokenizer files there), or pass tokenizer_path"
        + ("" if kind == "transformers" else ", or install open_clip, whose BPE vocabulary is used"))
  open_clip = kind == "open_clip"
  return ClipScorer(weights, clip_image_net(weights), tokenizer, clean_captions=open_clip,
                    pad_id=0 if open_clip else None)
