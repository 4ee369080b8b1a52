"""Text encoders that condition the diffusion model: CLIP's text tower and the LDM paper's transformer.

`CLIPTextModel` mirrors transformers' `CLIPTextModel` module tree (`text_model/embeddings/...`,
`text_model/encoder/layers_<i>/...`, `text_model/final_layer_norm`) so that interop/clip.py converts
its checkpoints mechanically. It serves SD 1.x (OpenAI ViT-L/14, quick_gelu, last layer) and SD 2.x
(OpenCLIP ViT-H/14, gelu; diffusers ships it cut to 23 of 24 layers, so "last" reproduces SD 2's
penultimate-layer conditioning for those weights, and "penultimate" does it for the full tower).

`LDMTextTransformer` is the conditioner the LDM paper trains jointly with the UNet (its `BERTEmbedder`):
bidirectional, pre-LN, learned positions, final LayerNorm.
"""

import dataclasses
from typing import Any, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_diffusion_jax.models import layers
from latent_diffusion_jax.models.attention import dot_product_attention
from latent_diffusion_jax.core.errors import UserInputError

Dtype = Any

OUTPUT_LAYERS = ("last", "penultimate")
ACTIVATIONS = ("quick_gelu", "gelu")

# transformers treats eos_token_id == 2 as "configs written before the tokenizer's EOS id was stored":
# the pooled token is then the largest id in the sequence (EOS is the last entry of CLIP's vocab).
_LEGACY_EOS_TOKEN_ID = 2
# Between blocks tokens are split over the batch only; "act_embed" (not the parameters' "embed",
# which FSDP shards) keeps the feature axis whole (parallel.DEFAULT_LOGICAL_AXIS_RULES).
_ACTIVATION_AXES = ("batch", "length", "act_embed")


class TextEncoderOutput(NamedTuple):
  """What every text encoder returns.

  Attributes:
    context: [batch, length, width], the per-token states the UNet cross-attends to.
    pooled: [batch, width], one vector per prompt (CLIP: the EOS token's state), or None for
      encoders without one.
  """
  context: jnp.ndarray
  pooled: Optional[jnp.ndarray]


def _activation(name: str):
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    # transformers' "gelu" is the exact erf form, not the tanh approximation.
    return lambda x: jax.nn.gelu(x, approximate=False)
  raise UserInputError(f"Unsupported hidden_act {name!r}; supported: {', '.join(ACTIVATIONS)}.")


def _check_length(input_ids: jnp.ndarray, max_length: int) -> None:
  if input_ids.ndim != 2:
    raise UserInputError(f"input_ids must be [batch, length] integers; got shape {input_ids.shape}.")
  if input_ids.shape[1] > max_length:
    raise UserInputError(f"Sequence length {input_ids.shape[1]} exceeds the {max_length} learned "
                     "positions of this text encoder.")


class SelfAttention(nn.Module):
  """Multi-head self-attention with separate q/k/v/out projections (transformers' `CLIPAttention`).

  Attributes:
    num_heads: number of attention heads.
    head_dim: features per head; None means `width // num_heads`.
    causal: let each token attend only to itself and earlier tokens.
    qkv_bias: whether q/k/v projections carry a bias (CLIP: yes; LDM's x-transformers: no).
    names: module names of the (q, k, v, out) projections, to mirror the reference checkpoint.
  """
  num_heads: int
  head_dim: Optional[int] = None
  causal: bool = False
  qkv_bias: bool = True
  names: Tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "out_proj")
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    batch, length, width = x.shape
    head_dim = self.head_dim or width // self.num_heads
    inner = head_dim * self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q_name, k_name, v_name, out_name = self.names

    def project(name):
      y = layers.dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, name=name, **kw)(x)
      return y.reshape(batch, length, self.num_heads, head_dim)

    o = dot_product_attention(project(q_name), project(k_name), project(v_name),
                              is_causal=self.causal, implementation=self.attention_impl)
    return layers.dense(width, ("heads", "embed"), name=out_name, **kw)(o.reshape(batch, length, inner))


class CLIPMLP(nn.Module):
  """fc1 -> activation -> fc2."""
  intermediate_size: int
  hidden_act: str = "quick_gelu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.dense(self.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(x)
    h = _activation(self.hidden_act)(h)
    return layers.dense(x.shape[-1], ("mlp", "embed"), name="fc2", **kw)(h)


class CLIPEncoderLayer(nn.Module):
  """Pre-LN block: x + attn(LN1(x)), then x + MLP(LN2(x)); causal for text, not for CLIP's vision tower."""
  intermediate_size: int
  num_attention_heads: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_impl: str = "auto"
  causal: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.layer_norm(self.layer_norm_eps, name="layer_norm1", **kw)(x)
    x = x + SelfAttention(self.num_attention_heads, causal=self.causal, attention_impl=self.attention_impl,
                          name="self_attn", **kw)(h)
    h = layers.layer_norm(self.layer_norm_eps, name="layer_norm2", **kw)(x)
    x = x + CLIPMLP(self.intermediate_size, self.hidden_act, name="mlp", **kw)(h)
    return layers.constrain(x, _ACTIVATION_AXES)


class _CLIPTextEmbeddings(nn.Module):
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jnp.ndarray) -> jnp.ndarray:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    tokens = layers.embed(self.vocab_size, self.hidden_size, name="token_embedding", **kw)(input_ids)
    # Position rows are few and read whole; they are never worth sharding.
    positions = layers.embed(self.max_position_embeddings, self.hidden_size, axes=(None, "embed"),
                             name="position_embedding", **kw)(jnp.arange(input_ids.shape[1])[None])
    return tokens + positions


class _CLIPEncoder(nn.Module):
  num_hidden_layers: int
  intermediate_size: int
  num_attention_heads: int
  hidden_act: str
  layer_norm_eps: float
  attention_impl: str
  skip_last: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for i in range(self.num_hidden_layers):
      block = CLIPEncoderLayer(self.intermediate_size, self.num_attention_heads, self.hidden_act,
                               self.layer_norm_eps, self.attention_impl, dtype=self.dtype,
                               param_dtype=self.param_dtype, name=f"layers_{i}")
      is_last = i == self.num_hidden_layers - 1
      if is_last and self.skip_last:
        # The skipped layer still gets parameters, so full-tower checkpoints load and export
        # unchanged whichever output is selected; it only runs while initializing.
        if self.is_initializing():
          block(x)
        continue
      x = block(x)
    return x


class _CLIPTextFields(nn.Module):
  """Hyperparameters shared by `CLIPTextModel` and its `text_model` submodule."""
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = _LEGACY_EOS_TOKEN_ID
  output_layer: str = "last"
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32


class CLIPTextTransformer(_CLIPTextFields):
  """transformers' `text_model`: embeddings, causal encoder, final LayerNorm, EOS pooling."""

  @nn.compact
  def __call__(self, input_ids: jnp.ndarray) -> TextEncoderOutput:
    if self.output_layer not in OUTPUT_LAYERS:
      raise UserInputError(f"Unknown output_layer {self.output_layer!r}; valid: {', '.join(OUTPUT_LAYERS)}.")
    if self.output_layer == "penultimate" and self.num_hidden_layers < 2:
      raise UserInputError("output_layer='penultimate' needs at least 2 hidden layers.")
    _check_length(input_ids, self.max_position_embeddings)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    embeddings = _CLIPTextEmbeddings(self.vocab_size, self.hidden_size,
                                     self.max_position_embeddings, name="embeddings", **kw)
    x = embeddings(input_ids)
    x = _CLIPEncoder(self.num_hidden_layers, self.intermediate_size, self.num_attention_heads,
                     self.hidden_act, self.layer_norm_eps, self.attention_impl,
                     skip_last=self.output_layer == "penultimate", name="encoder", **kw)(x)
    x = layers.layer_norm(self.layer_norm_eps, name="final_layer_norm", **kw)(x)

    if self.eos_token_id == _LEGACY_EOS_TOKEN_ID:
      eos_index = jnp.argmax(input_ids, axis=-1)
    else:
      # First occurrence: tokenizers that pad with EOS repeat it after the real one.
      eos_index = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(x, eos_index[:, None, None], axis=1)[:, 0]
    return TextEncoderOutput(x, pooled)


class CLIPTextModel(_CLIPTextFields):
  """CLIP's text transformer (transformers' `CLIPTextModel`), params under `text_model/`.

  Attributes:
    vocab_size: token-embedding rows (49408 for CLIP's BPE vocabulary).
    hidden_size: model width.
    intermediate_size: MLP hidden width.
    num_hidden_layers: number of encoder layers (all of them get parameters).
    num_attention_heads: attention heads per layer.
    max_position_embeddings: learned positions; inputs may be shorter, never longer.
    hidden_act: "quick_gelu" (OpenAI CLIP, SD 1.x) or "gelu" (exact erf; OpenCLIP, SD 2.x).
    layer_norm_eps: epsilon of every LayerNorm.
    eos_token_id: which token is pooled. The legacy value 2 (in SD 1.x/2.x configs) pools the
      position of the largest id, as transformers does; any other value pools the first position
      holding that id.
    output_layer: "last": final LayerNorm of the last layer's output (transformers'
      `last_hidden_state`; SD 1.x). "penultimate": final LayerNorm of the second-to-last layer's
      output (SD 2.x's OpenCLIP conditioner on a full 24-layer tower); the last layer is not run.
    attention_impl: an implementation name of `models.attention.dot_product_attention`.
    dtype: computation dtype (LayerNorm statistics and softmax stay float32).
    param_dtype: parameter dtype.
  """

  @nn.compact
  def __call__(self, input_ids: jnp.ndarray) -> TextEncoderOutput:
    """Encodes token ids.

    Args:
      input_ids: int [batch, length], length <= max_position_embeddings. Each row should hold its
        EOS token (the tokenizer adds it); the pooled output reads that position.

    Returns:
      `TextEncoderOutput` in `dtype`:
        context: [batch, length, hidden_size], the final LayerNorm applied to the output of the
          layer chosen by `output_layer` (the UNet's cross-attention context).
        pooled: [batch, hidden_size], `context` at each row's EOS position (see `eos_token_id`).
          With output_layer="last" this equals transformers' `pooler_output`.
    """
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(_CLIPTextFields)
              if f.name not in ("parent", "name")}
    return CLIPTextTransformer(**fields, name="text_model")(input_ids)

  @classmethod
  def from_hf_config(cls, config: dict, **overrides) -> "CLIPTextModel":
    """Builds the module from a transformers `CLIPTextConfig` dict (a CLIPTextModel's config.json).

    Args:
      config: the config dict; a full `CLIPConfig` dict is accepted too (its `text_config` is used).
      **overrides: module fields that the config does not hold or that should win over it, e.g.
        `output_layer`, `dtype`, `param_dtype`, `attention_impl`.

    Returns:
      An unbound `CLIPTextModel`.
    """
    if "text_config" in config:
      config = config["text_config"]
    hidden_act = config.get("hidden_act", "quick_gelu")
    if hidden_act not in ACTIVATIONS:
      raise UserInputError(f"Unsupported hidden_act {hidden_act!r} in the CLIP config; "
                       f"supported: {', '.join(ACTIVATIONS)}.")
    # Defaults are transformers' CLIPTextConfig defaults, for keys old configs leave out.
    fields = dict(
        vocab_size=config.get("vocab_size", 49408),
        hidden_size=config.get("hidden_size", 512),
        intermediate_size=config.get("intermediate_size", 2048),
        num_hidden_layers=config.get("num_hidden_layers", 12),
        num_attention_heads=config.get("num_attention_heads", 8),
        max_position_embeddings=config.get("max_position_embeddings", 77),
        hidden_act=hidden_act,
        layer_norm_eps=config.get("layer_norm_eps", 1e-5),
        eos_token_id=config.get("eos_token_id", 49407),
    )
    fields.update(overrides)
    return cls(**fields)

  def to_hf_config(self) -> dict:
    """The transformers `CLIPTextConfig` dict for these hyperparameters (for exported checkpoints)."""
    return dict(
        architectures=["CLIPTextModel"], model_type="clip_text_model",
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
        num_attention_heads=self.num_attention_heads,
        max_position_embeddings=self.max_position_embeddings, hidden_act=self.hidden_act,
        layer_norm_eps=self.layer_norm_eps, eos_token_id=self.eos_token_id)


class LDMBlock(nn.Module):
  """A pre-LN bidirectional transformer block (the LDM conditioners' block; also the layout encoder's)."""
  heads: int
  head_dim: Optional[int]
  mlp_ratio: float
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    h = layers.layer_norm(1e-5, name="attn_norm", **kw)(x)
    x = x + SelfAttention(self.heads, self.head_dim, causal=False, qkv_bias=False,
                          names=("to_q", "to_k", "to_v", "to_out"),
                          attention_impl=self.attention_impl, name="attn", **kw)(h)
    h = layers.layer_norm(1e-5, name="ff_norm", **kw)(x)
    h = layers.dense(int(width * self.mlp_ratio), ("embed", "mlp"), name="ff_in", **kw)(h)
    h = layers.dense(width, ("mlp", "embed"), name="ff_out", **kw)(jax.nn.gelu(h, approximate=False))
    return layers.constrain(x + h, _ACTIVATION_AXES)


class LDMTextTransformer(nn.Module):
  """The LDM paper's jointly trained text conditioner: a bidirectional pre-LN transformer.

  It follows the paper's `BERTEmbedder` (x-transformers `TransformerWrapper` + `Encoder`): token and
  learned absolute position embeddings, `depth` blocks of LN -> self-attention (no mask, no q/k/v
  bias) -> residual and LN -> Linear/GELU/Linear -> residual, then a final LayerNorm. The paper's
  text-to-image model uses width 1280, depth 32, 8 heads of 64 features, BERT's 30522-token vocab.

  Attributes:
    vocab_size: token-embedding rows.
    max_length: learned positions; inputs may be shorter, never longer.
    width: model width.
    depth: number of blocks.
    heads: attention heads.
    head_dim: features per head; None means `width // heads`. x-transformers fixes it at 64
      whatever the width (so the paper's model attends in 512 features); set 64 to match it.
    mlp_ratio: MLP hidden width over `width`.
    attention_impl: an implementation name of `models.attention.dot_product_attention`.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """
  vocab_size: int = 30522
  max_length: int = 77
  width: int = 1280
  depth: int = 32
  heads: int = 8
  head_dim: Optional[int] = None
  mlp_ratio: float = 4.0
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jnp.ndarray) -> TextEncoderOutput:
    """Encodes token ids.

    Args:
      input_ids: int [batch, length], length <= max_length.

    Returns:
      `TextEncoderOutput` in `dtype` without a pooled vector; its context [batch, length, width]
      is the final LayerNorm's output, every token seeing every other.
    """
    _check_length(input_ids, self.max_length)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.embed(self.vocab_size, self.width, name="token_embedding", **kw)(input_ids)
    x = x + layers.embed(self.max_length, self.width, axes=(None, "embed"), name="position_embedding",
                         **kw)(jnp.arange(input_ids.shape[1])[None])
    for i in range(self.depth):
      x = LDMBlock(self.heads, self.head_dim, self.mlp_ratio, self.attention_impl,
                    name=f"layers_{i}", **kw)(x)
    return TextEncoderOutput(layers.layer_norm(1e-5, name="final_layer_norm", **kw)(x), None)
