"""Key maps between diffusers' state-dict layout and the original Stable Diffusion (CompVis/ldm) one.

Our parameter trees follow diffusers, so a single-file checkpoint is written as: Flax params ->
diffusers keys (interop/convert.py) -> original keys (here). Each map is a function of one diffusers
key, derived from the module's config; importing inverts it over every key the module expects, so
a key the map does not know surfaces as "unexpected" instead of being guessed at.

Original layouts (prefixes in the full checkpoint):
  model.diffusion_model.   openaimodel.UNetModel: input_blocks / middle_block / output_blocks
  first_stage_model.       AutoencoderKL: encoder/decoder .down/.mid/.up, 1x1-conv attention
  cond_stage_model.transformer.text_model.   FrozenCLIPEmbedder (SD 1.x), transformers layout
  cond_stage_model.model.  FrozenOpenCLIPEmbedder (SD 2.x), open_clip layout, fused q/k/v
"""

import re
from typing import Callable, Dict, Iterable, Mapping

import numpy as np

from latent_diffusion_jax.models.autoencoder import AutoencoderKL
from latent_diffusion_jax.models.unet import UNet2DConditionModel
from latent_diffusion_jax.core.errors import UserInputError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."

# ResBlock sublayers: diffusers name -> openaimodel name (nn.Sequential indices).
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
               "class_embedding": "label_emb"}
_VAE_FIXED = {"conv_norm_out": "norm_out"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_FIXED = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _split(key: str):
  """'a.b.weight' -> ('a.b', 'weight')."""
  module, _, leaf = key.rpartition(".")
  return module, leaf


def _rename_module(module: str, table: Mapping[str, str]) -> str:
  for old, new in table.items():
    if module == old:
      return new
  raise KeyError(module)


def check_unet_exportable(unet: UNet2DConditionModel) -> None:
  """Raises ValueError for UNet settings the original UNetModel cannot express."""
  problems = []
  if not unet.mid_block_attention:
    problems.append("mid_block_attention=False (the original middle block always has a transformer)")
  if not unet.flip_sin_to_cos or unet.freq_shift != 0:
    problems.append("a timestep embedding other than flip_sin_to_cos=True, freq_shift=0")
  base = unet.block_out_channels[0]
  if any(c % base for c in unet.block_out_channels):
    problems.append(f"block_out_channels {tuple(unet.block_out_channels)} that are not multiples "
                    f"of the first ({base}), i.e. no channel_mult")
  if problems:
    raise UserInputError("This UNet has no original Stable Diffusion (ldm UNetModel) layout: "
                     + "; ".join(problems) + ". Export it with --format native or diffusers.")


def unet_key_to_ldm(unet: UNet2DConditionModel) -> Callable[[str], str]:
  """Returns the map diffusers UNet key -> original key (without `UNET_PREFIX`)."""
  check_unet_exportable(unet)
  per_level = unet.layers_per_block + 1  # input/output blocks per level (+ resampler or + skip)
  levels = len(unet.block_out_channels)

  def resnet(prefix: str, rest: str) -> str:
    module, leaf = _split(rest)
    return f"{prefix}.{_UNET_RESNET[module]}.{leaf}"

  def to_ldm(key: str) -> str:
    module, leaf = _split(key)
    if module in _UNET_FIXED:
      return f"{_UNET_FIXED[module]}.{leaf}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key)
    if m:
      level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
      if kind == "downsamplers":
        return f"input_blocks.{1 + level * per_level + unet.layers_per_block}.0.op.{_split(rest)[1]}"
      block = 1 + level * per_level + j
      return resnet(f"input_blocks.{block}.0", rest) if kind == "resnets" else \
          f"input_blocks.{block}.1.{rest}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
      kind, j, rest = m[1], int(m[2]), m[3]
      return resnet(f"middle_block.{2 * j}", rest) if kind == "resnets" else f"middle_block.1.{rest}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key)
    if m:
      i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
      if kind == "upsamplers":
        # The upsampler shares the level's last output block, after its transformer if any.
        has_attention = unet.attention_levels[levels - 1 - i]
        block = i * per_level + unet.layers_per_block
        return f"output_blocks.{block}.{2 if has_attention else 1}.conv.{_split(rest)[1]}"
      block = i * per_level + j
      return resnet(f"output_blocks.{block}.0", rest) if kind == "resnets" else \
          f"output_blocks.{block}.1.{rest}"
    raise KeyError(f"No original-layout name for UNet key {key!r}.")

  return to_ldm


def vae_key_to_ldm(vae: AutoencoderKL) -> Callable[[str], str]:
  """Returns the map diffusers AutoencoderKL key -> original key (without `VAE_PREFIX`)."""
  levels = len(vae.block_out_channels)

  def resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")

  def to_ldm(key: str) -> str:
    if key.startswith(("quant_conv.", "post_quant_conv.")):
      return key
    side, _, rest = key.partition(".")
    module, leaf = _split(rest)
    if module in ("conv_in", "conv_out"):
      return key
    if module in _VAE_FIXED:
      return f"{side}.{_VAE_FIXED[module]}.{leaf}"
    m = re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest)
    if m:
      return f"{side}.mid.block_{int(m[1]) + 1}.{resnet(m[2])}"
    m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module)
    if m:
      return f"{side}.mid.attn_1.{_rename_module(m[1], _VAE_ATTENTION)}.{leaf}"
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", rest)
    if m:
      direction, i, kind, j, tail = m[1], int(m[2]), m[3], int(m[4]), m[5]
      # The original decoder numbers its levels by resolution, as the encoder does; diffusers
      # numbers them in the order they run.
      level = i if direction == "down" else levels - 1 - i
      if kind == "resnets":
        return f"{side}.{direction}.{level}.block.{j}.{resnet(tail)}"
      return f"{side}.{direction}.{level}.{kind[:-2]}.{tail}"  # downsample / upsample
    raise KeyError(f"No original-layout name for VAE key {key!r}.")

  return to_ldm


def is_vae_attention_projection(ldm_key: str) -> bool:
  """True for the VAE attention weights the original stores as 1x1 convs [C, C, 1, 1]."""
  return bool(re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key))


def clip_key_to_ldm(key: str) -> str:
  """transformers CLIPTextModel key (with `text_model.`) -> FrozenCLIPEmbedder key (no prefix)."""
  return key


def open_clip_key_to_ldm(key: str) -> str:
  """transformers CLIPTextModel key -> open_clip key (no prefix); q/k/v map to `attn.in_proj`."""
  if key in _OPEN_CLIP_FIXED:
    return _OPEN_CLIP_FIXED[key]
  m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
  if m:
    layer, module, leaf = m[1], m[2], m[3]
    if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
      return f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"
    return f"transformer.resblocks.{layer}.{_rename_module(module, _OPEN_CLIP_LAYER)}.{leaf}"
  raise KeyError(f"No open_clip name for text encoder key {key!r}.")


def to_ldm_state_dict(state_dict: Mapping[str, np.ndarray], to_ldm: Callable[[str], str],
                      prefix: str) -> Dict[str, np.ndarray]:
  """Renames a diffusers state dict to original keys under `prefix`; fuses open_clip q/k/v."""
  out: Dict[str, np.ndarray] = {}
  fused: Dict[str, Dict[str, np.ndarray]] = {}
  for key, value in state_dict.items():
    new = prefix + to_ldm(key)
    if new.endswith((".attn.in_proj_weight", ".attn.in_proj_bias")):
      fused.setdefault(new, {})[key.split(".")[-2][0]] = value  # "q", "k" or "v"
      continue
    if is_vae_attention_projection(new) and value.ndim == 2:
      value = value[:, :, None, None]
    out[new] = value
  for key, parts in fused.items():
    out[key] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
  return out


def from_ldm_state_dict(ldm: Mapping[str, np.ndarray], expected_keys: Iterable[str],
                        to_ldm: Callable[[str], str], prefix: str) -> Dict[str, np.ndarray]:
  """Inverts `to_ldm_state_dict` for the diffusers keys a module expects.

  Args:
    ldm: original-layout tensors of one network, keys still carrying `prefix`.
    expected_keys: every diffusers key of the module being loaded.
    to_ldm: the forward key map.
    prefix: the network's prefix in the original checkpoint.

  Returns:
    Diffusers key -> array. Keys that the map does not produce are kept under their original name,
    so that `convert.torch_to_flax` lists them as unexpected; expected keys missing from `ldm` are
    left out, so that it lists those as missing.
  """
  inverse: Dict[str, list] = {}
  for key in expected_keys:
    inverse.setdefault(prefix + to_ldm(key), []).append(key)
  out: Dict[str, np.ndarray] = {}
  for ldm_key, value in ldm.items():
    targets = inverse.get(ldm_key)
    if targets is None:
      out[ldm_key] = value
    elif len(targets) == 3:  # fused open_clip q/k/v, stored in that order
      for key, part in zip(sorted(targets, key=lambda k: "qkv".index(k.split(".")[-2][0])),
                           np.split(np.asarray(value), 3, axis=0)):
        out[key] = part
    else:
      value = np.asarray(value)
      if is_vae_attention_projection(ldm_key) and value.ndim == 4:
        value = value[:, :, 0, 0]
      out[targets[0]] = value
  return out
