"""CLIP's image tower, and both towers with the projections into the joint embedding space.

The CLIP score compares an image embedding with a caption embedding, so it needs what the diffusion
model's conditioner does not: the vision transformer and the two projections. The module trees
mirror transformers' `CLIPVisionModelWithProjection` (`vision_model/embeddings/...`,
`vision_model/pre_layrnorm` (sic), `vision_model/encoder/layers_<i>/...`,
`vision_model/post_layernorm`, `visual_projection`) and `CLIPTextModelWithProjection` (`text_model/...`,
`text_projection`), so a transformers `CLIPModel` checkpoint converts mechanically and open_clip
checkpoints convert by renaming keys into that layout (evaluation/feature_nets/clip_weights.py).

One module serves OpenAI's ViT-L/14 (quick_gelu) and OpenCLIP's ViT-H-14 / ViT-bigG-14 (exact gelu):
patch convolution without bias, a class token, learned positions, LayerNorm before the encoder
("pre_layrnorm" / open_clip's ln_pre), bidirectional pre-LN blocks, LayerNorm of the class token
("post_layernorm" / ln_post) and a projection without bias.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.models import layers
from latent_diffusion_jax.models.text_encoders import (
    ACTIVATIONS, CLIPEncoderLayer, CLIPTextModel, CLIPTextTransformer)

Dtype = Any


class _CLIPVisionEmbeddings(nn.Module):
  """Patches -> tokens, the class token first, plus learned positions."""
  hidden_size: int
  image_size: int
  patch_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jnp.ndarray) -> jnp.ndarray:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = self.patch_size
    patches = layers.conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                          name="patch_embedding", **kw)(pixels)
    batch = patches.shape[0]
    patches = patches.reshape(batch, -1, self.hidden_size)
    class_embedding = self.param(
        "class_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None,)),
        (self.hidden_size,), self.param_dtype)
    cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (batch, 1, self.hidden_size))
    tokens = jnp.concatenate([cls, patches.astype(self.dtype)], axis=1)
    num_positions = (self.image_size // p) ** 2 + 1
    positions = layers.embed(num_positions, self.hidden_size, axes=(None, "embed"),
                             name="position_embedding", **kw)(jnp.arange(num_positions)[None])
    return tokens + positions


class _CLIPVisionEncoder(nn.Module):
  num_hidden_layers: int
  intermediate_size: int
  num_attention_heads: int
  hidden_act: str
  layer_norm_eps: float
  attention_impl: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for i in range(self.num_hidden_layers):
      x = CLIPEncoderLayer(self.intermediate_size, self.num_attention_heads, self.hidden_act,
                           self.layer_norm_eps, self.attention_impl, causal=False,
                           dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{i}")(x)
    return x


class CLIPVisionTransformer(nn.Module):
  """transformers' `vision_model`: returns the post-LayerNorm class token [batch, hidden_size]."""
  image_size: int = 224
  patch_size: int = 14
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jnp.ndarray) -> jnp.ndarray:
    size = (self.image_size, self.image_size)
    if pixels.ndim != 4 or tuple(pixels.shape[1:3]) != size or pixels.shape[3] != 3:
      raise UserInputError(f"CLIP's vision tower takes preprocessed [N, {self.image_size}, "
                           f"{self.image_size}, 3] pixels; got shape {pixels.shape}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _CLIPVisionEmbeddings(self.hidden_size, self.image_size, self.patch_size,
                              name="embeddings", **kw)(pixels)
    x = layers.layer_norm(self.layer_norm_eps, name="pre_layrnorm", **kw)(x)
    x = _CLIPVisionEncoder(self.num_hidden_layers, self.intermediate_size, self.num_attention_heads,
                           self.hidden_act, self.layer_norm_eps, self.attention_impl,
                           name="encoder", **kw)(x)
    return layers.layer_norm(self.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])


class CLIPVisionModelWithProjection(CLIPVisionTransformer):
  """CLIP's image embedding (transformers' `CLIPModel.get_image_features`, open_clip's
  `encode_image`), unnormalized.

  Attributes:
    image_size: input height and width (224 for ViT-L/14 and ViT-H-14).
    patch_size: patch height and width (14).
    hidden_size: width of the vision transformer.
    intermediate_size: MLP hidden width.
    num_hidden_layers: encoder blocks.
    num_attention_heads: attention heads per block.
    hidden_act: "quick_gelu" (OpenAI CLIP) or "gelu" (exact erf; OpenCLIP).
    layer_norm_eps: epsilon of every LayerNorm.
    projection_dim: width of the joint embedding space.
    attention_impl: an implementation name of `models.attention.dot_product_attention`.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """
  projection_dim: int = 768

  @nn.compact
  def __call__(self, pixels: jnp.ndarray) -> jnp.ndarray:
    """Embeds preprocessed images.

    Args:
      pixels: float [N, image_size, image_size, 3], resized, cropped and normalized with CLIP's
        mean and std (evaluation/feature_nets/clip_preprocess.py).

    Returns:
      [N, projection_dim] image embeddings in `dtype`.
    """
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(CLIPVisionTransformer)
              if f.name not in ("parent", "name")}
    pooled = CLIPVisionTransformer(**fields, name="vision_model")(pixels)
    return layers.dense(self.projection_dim, ("embed", "mlp"), use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="visual_projection")(pooled)

  @classmethod
  def from_hf_config(cls, config: dict, **overrides) -> "CLIPVisionModelWithProjection":
    """Builds the module from a transformers `CLIPConfig` dict (its `vision_config` and
    `projection_dim`) or a `CLIPVisionConfig` dict; `overrides` set module fields (dtype, ...)."""
    projection_dim = config.get("projection_dim", 512)
    vision = config.get("vision_config", config)
    hidden_act = vision.get("hidden_act", "quick_gelu")
    if hidden_act not in ACTIVATIONS:
      raise UserInputError(f"Unsupported vision hidden_act {hidden_act!r} in the CLIP config; "
                           f"supported: {', '.join(ACTIVATIONS)}.")
    if vision.get("num_channels", 3) != 3:
      raise UserInputError(f"CLIP vision config has num_channels={vision['num_channels']}; only RGB "
                           "(3) is supported.")
    # Defaults are transformers' CLIPVisionConfig defaults, for keys old configs leave out.
    fields = dict(
        image_size=vision.get("image_size", 224), patch_size=vision.get("patch_size", 32),
        hidden_size=vision.get("hidden_size", 768),
        intermediate_size=vision.get("intermediate_size", 3072),
        num_hidden_layers=vision.get("num_hidden_layers", 12),
        num_attention_heads=vision.get("num_attention_heads", 12), hidden_act=hidden_act,
        layer_norm_eps=vision.get("layer_norm_eps", 1e-5), projection_dim=projection_dim)
    fields.update(overrides)
    return cls(**fields)


class CLIPTextModelWithProjection(CLIPTextModel):
  """CLIP's caption embedding (transformers' `CLIPModel.get_text_features`, open_clip's
  `encode_text`), unnormalized: the pooled token of `CLIPTextModel`'s last layer, projected.

  Attributes are `CLIPTextModel`'s plus `projection_dim`. The pooled token follows
  `eos_token_id`: the legacy value 2 pools at the largest id (OpenAI's and open_clip's argmax over
  token ids, which finds <|endoftext|> since it is the last entry of the vocabulary).
  """
  projection_dim: int = 768

  @nn.compact
  def __call__(self, input_ids: jnp.ndarray) -> jnp.ndarray:
    """Embeds token ids [batch, length] (length <= max_position_embeddings) -> [batch, projection_dim]."""
    if self.output_layer != "last":
      raise UserInputError("CLIP's text embedding reads the last layer; output_layer must be 'last'.")
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(CLIPTextModel)
              if f.name not in ("parent", "name")}
    pooled = CLIPTextTransformer(**fields, name="text_model")(input_ids).pooled
    return layers.dense(self.projection_dim, ("embed", "mlp"), use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="text_projection")(pooled)

  @classmethod
  def from_hf_config(cls, config: dict, **overrides) -> "CLIPTextModelWithProjection":
    """Builds the module from a transformers `CLIPConfig` dict (its `text_config` and
    `projection_dim`) or a `CLIPTextConfig` dict; `overrides` set module fields."""
    overrides.setdefault("projection_dim", config.get("projection_dim", 512))
    return super().from_hf_config(config, **overrides)
