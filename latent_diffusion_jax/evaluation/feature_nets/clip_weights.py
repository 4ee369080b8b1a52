"""CLIP weights for the CLIP score: transformers `CLIPModel` directories and open_clip checkpoints.

Accepted:
  * transformers: a directory as `CLIPModel.save_pretrained` (or a Hub snapshot such as
    openai/clip-vit-large-patch14 or laion/CLIP-ViT-H-14-laion2B-s32B-b79K) writes it: config.json
    with `vision_config`, `text_config` and `projection_dim`, and model.safetensors (or a sharded
    index; pytorch_model.bin with allow_pickle). An optional preprocessor_config.json supplies the
    normalization mean and std.
  * open_clip: a state dict as open_clip saves it (`visual.conv1.weight`, ...,
    `transformer.resblocks.N...`, `text_projection`), in a .safetensors file or, with allow_pickle, a
    .bin/.pt/.pth file (open_clip_pytorch_model.bin of laion2b_s32b_b79k; training checkpoints
    {"state_dict": {"module.visual...": ...}} too), or a directory holding open_clip_model.safetensors
    / open_clip_pytorch_model.bin and open_clip_config.json. Its architecture comes from
    `model_name` ("ViT-H-14", "ViT-L-14-quickgelu", ...: our table, else the installed open_clip
    package's model_configs), a JSON file in open_clip's model-config format, or the directory's
    open_clip_config.json.

open_clip keys are renamed into transformers' CLIPModel layout (the fused attention input projection
split into q, k, v; `visual.proj` and `text_projection` matrices transposed into Linear weights),
then both sources take the same mechanical path into our Flax trees. open_clip's text tower is the
transformer our `CLIPTextModel` already is (causal mask over the whole context, pre-LN, exact gelu
unless quick_gelu, final LayerNorm, pooling at the argmax of the token ids), so it loads into it.
"""

import dataclasses
import functools
import importlib.util
import json
import os
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion_jax.core.errors import InputFileError, MissingInputError, UserInputError
from latent_diffusion_jax.evaluation.feature_nets.clip_preprocess import (
    OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
from latent_diffusion_jax.interop.convert import torch_to_flax
from latent_diffusion_jax.interop.files import load_state_dict
from latent_diffusion_jax.models.clip_vision import (
    CLIPTextModelWithProjection, CLIPVisionModelWithProjection)

KINDS = ("auto", "transformers", "open_clip")
OPEN_CLIP_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"

_TEXT = dict(context_length=77, vocab_size=49408)
# open_clip's model configs for the CLIP towers this module supports (open_clip/model_configs/*.json);
# a "-quickgelu" suffix selects QuickGELU, as open_clip's names do.
OPEN_CLIP_CONFIGS = {
    "ViT-B-32": dict(embed_dim=512, vision_cfg=dict(image_size=224, layers=12, width=768, patch_size=32),
                     text_cfg=dict(_TEXT, width=512, heads=8, layers=12)),
    "ViT-B-16": dict(embed_dim=512, vision_cfg=dict(image_size=224, layers=12, width=768, patch_size=16),
                     text_cfg=dict(_TEXT, width=512, heads=8, layers=12)),
    "ViT-L-14": dict(embed_dim=768, vision_cfg=dict(image_size=224, layers=24, width=1024, patch_size=14),
                     text_cfg=dict(_TEXT, width=768, heads=12, layers=12)),
    "ViT-L-14-336": dict(embed_dim=768,
                         vision_cfg=dict(image_size=336, layers=24, width=1024, patch_size=14),
                         text_cfg=dict(_TEXT, width=768, heads=12, layers=12)),
    "ViT-H-14": dict(embed_dim=1024, vision_cfg=dict(image_size=224, layers=32, width=1280,
                                                     head_width=80, patch_size=14),
                     text_cfg=dict(_TEXT, width=1024, heads=16, layers=24)),
    "ViT-g-14": dict(embed_dim=1024, vision_cfg=dict(image_size=224, layers=40, width=1408, head_width=88,
                                                     mlp_ratio=4.3637, patch_size=14),
                     text_cfg=dict(_TEXT, width=1024, heads=16, layers=24)),
    "ViT-bigG-14": dict(embed_dim=1280, vision_cfg=dict(image_size=224, layers=48, width=1664,
                                                        head_width=104, mlp_ratio=4.9231, patch_size=14),
                        text_cfg=dict(_TEXT, width=1280, heads=20, layers=32)),
}

# Config entries our towers implement only at these values (open_clip's defaults); anything else is
# refused by name rather than computed differently.
_VISION_FIXED = dict(ls_init_value=None, attentional_pool=False, no_ln_pre=False,
                     pos_embed_type="learnable", final_ln_after_pool=False, pool_type="tok",
                     act_kwargs=None, block_type=None, qk_norm=False, scaled_cosine_attn=False,
                     scale_heads=False, scale_attn_inner=False, scale_attn=False, scale_fc=False,
                     timm_model_name=None)
_TEXT_FIXED = dict(ls_init_value=None, embed_cls=False, no_causal_mask=False,
                   final_ln_after_pool=False, proj_bias=False, proj_type="linear", act_kwargs=None,
                   block_type=None, qk_norm=False, scaled_cosine_attn=False, scale_heads=False,
                   scale_attn_inner=False, scale_attn=False, scale_fc=False, hf_model_name=None,
                   hf_tokenizer_name=None, tokenizer_mode=None)
# Entries that do not change inference (dropout, outputs we do not read, the logit scale).
_VISION_IGNORED = ("patch_dropout", "output_tokens", "attn_pooler_queries", "attn_pooler_heads",
                   "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop",
                   "timm_drop_path")
_TEXT_IGNORED = ("pad_id", "output_tokens", "tokenizer_kwargs", "hf_model_pretrained",
                 "hf_proj_type", "hf_pooler_type")
_TOP_IGNORED = ("custom_text", "init_logit_scale", "init_logit_bias", "nonscalar_logit_scale",
                "cast_dtype", "output_dict")


@dataclasses.dataclass(frozen=True)
class ClipWeights:
  """Both towers of a CLIP model, converted, with the preprocessing constants of its source.

  Attributes:
    source: "transformers" or "open_clip".
    vision: the image tower; `vision.apply({"params": vision_params}, pixels)`.
    vision_params: nested dict of host numpy arrays.
    text: the caption tower; `text.apply({"params": text_params}, input_ids)`.
    text_params: nested dict of host numpy arrays.
    mean: per-channel normalization mean.
    std: per-channel normalization standard deviation.
    crop_rounding: center-crop offset convention of the source's own preprocessing.
    describe: where the weights came from, for reports.
  """
  source: str
  vision: CLIPVisionModelWithProjection
  vision_params: Any = dataclasses.field(repr=False)
  text: CLIPTextModelWithProjection
  text_params: Any = dataclasses.field(repr=False)
  mean: Tuple[float, float, float] = OPENAI_CLIP_MEAN
  std: Tuple[float, float, float] = OPENAI_CLIP_STD
  crop_rounding: str = "floor"
  describe: str = ""


_EXPECTED = (
    "a transformers CLIPModel directory (config.json + model.safetensors, as "
    "CLIPModel.save_pretrained writes it, e.g. a local copy of openai/clip-vit-large-patch14) or an "
    "open_clip checkpoint (a state dict .safetensors/.bin/.pt, e.g. open_clip_pytorch_model.bin of "
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K, with model_name='ViT-H-14'). Nothing is downloaded; copy "
    "the weights there first, e.g. `huggingface-cli download openai/clip-vit-large-patch14 "
    "--local-dir DIR` on a machine with network access")


def detect_kind(path: str) -> str:
  """"transformers" or "open_clip" for a weights path; errors name what was expected."""
  if not os.path.exists(path):
    raise MissingInputError(f"No CLIP weights at {path!r}. Expected {_EXPECTED}.")
  if os.path.isdir(path):
    config_path = os.path.join(path, "config.json")
    if os.path.isfile(config_path):
      with open(config_path) as f:
        config = json.load(f)
      if "vision_config" in config and "text_config" in config:
        return "transformers"
    if any(os.path.isfile(os.path.join(path, n)) for n in OPEN_CLIP_WEIGHT_NAMES):
      return "open_clip"
    raise InputFileError(f"{path!r} is not a CLIP model directory: found {sorted(os.listdir(path))}. "
                         f"Expected {_EXPECTED}.")
  return "open_clip"


# --- transformers -------------------------------------------------------------------------------


def _drop_buffers(key: str) -> Optional[str]:
  if key == "logit_scale" or key.endswith("position_ids"):
    return None  # the contrastive temperature and an arange buffer: not used by the embeddings
  return key


def _split_towers(state_dict: Dict[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
  vision, text = {}, {}
  for key, value in state_dict.items():
    target = vision if key.startswith(("vision_model.", "visual_projection.")) else text
    target[key] = value
  return vision, text


def _convert(vision, text, vision_sd, text_sd, what: str):
  pixels = jnp.zeros((1, vision.image_size, vision.image_size, 3), jnp.float32)
  ids = jnp.zeros((1, text.max_position_embeddings), jnp.int32)
  vision_ref = jax.eval_shape(vision.init, jax.random.key(0), pixels)["params"]
  text_ref = jax.eval_shape(text.init, jax.random.key(0), ids)["params"]
  vision_params = torch_to_flax(vision_sd, vision_ref, what=f"CLIP vision tower of {what}",
                                rename=_drop_buffers)
  text_params = torch_to_flax(text_sd, text_ref, what=f"CLIP text tower of {what}",
                              rename=_drop_buffers)
  return vision_params, text_params


def load_transformers_clip(directory: str, *, dtype: Any = jnp.float32,
                           allow_pickle: bool = False) -> ClipWeights:
  """Loads a transformers `CLIPModel` directory (see the module docstring)."""
  detect_kind(directory)  # existence and layout errors
  if not os.path.isdir(directory):
    raise InputFileError(f"transformers CLIP weights are a directory (config.json + "
                         f"model.safetensors); {directory!r} is a file. Expected {_EXPECTED}.")
  with open(os.path.join(directory, "config.json")) as f:
    config = json.load(f)
  if "vision_config" not in config or "text_config" not in config:
    raise InputFileError(f"{directory}/config.json is not a CLIPModel config (no vision_config and "
                         f"text_config; architectures={config.get('architectures')}). Expected "
                         f"{_EXPECTED}.")
  kw = dict(dtype=dtype, param_dtype=dtype)
  vision = CLIPVisionModelWithProjection.from_hf_config(config, **kw)
  text = CLIPTextModelWithProjection.from_hf_config(config, **kw)
  vision_sd, text_sd = _split_towers(load_state_dict(directory, allow_pickle=allow_pickle))
  vision_params, text_params = _convert(vision, text, vision_sd, text_sd, repr(directory))
  mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
  processor_path = os.path.join(directory, "preprocessor_config.json")
  if os.path.isfile(processor_path):
    with open(processor_path) as f:
      processor = json.load(f)
    if processor.get("resample", 3) != 3:
      raise InputFileError(f"{processor_path}: resample={processor['resample']}; the CLIP score "
                           "preprocessing implements bicubic (3) only.")
    mean = tuple(processor.get("image_mean", mean))
    std = tuple(processor.get("image_std", std))
  return ClipWeights("transformers", vision, vision_params, text, text_params, mean, std, "floor",
                     f"transformers CLIPModel {directory}")


# --- open_clip ----------------------------------------------------------------------------------


def _package_model_config(name: str) -> Optional[dict]:
  """open_clip's own config for `name`, read from the installed package without importing it."""
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "model_configs", f"{name}.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def open_clip_config(model_name: str) -> Tuple[dict, dict]:
  """(model config, preprocess config) for an open_clip model name or config JSON path.

  Args:
    model_name: a name such as "ViT-H-14" or "ViT-L-14-quickgelu", or a path to a JSON file in
      open_clip's model-config format ({"embed_dim", "vision_cfg", "text_cfg", ...}) or the Hub's
      open_clip_config.json ({"model_cfg": ..., "preprocess_cfg": ...}).
  """
  if model_name.endswith(".json") or os.path.sep in model_name:
    if not os.path.isfile(model_name):
      raise MissingInputError(f"open_clip model config {model_name!r} does not exist.")
    with open(model_name) as f:
      config = json.load(f)
    if "model_cfg" in config:
      return config["model_cfg"], config.get("preprocess_cfg", {})
    return config, config.get("preprocess_cfg", {})
  base, quick = (model_name[:-len("-quickgelu")], True) if model_name.endswith("-quickgelu") \
      else (model_name, False)
  config = OPEN_CLIP_CONFIGS.get(base)
  config = dict(config, quick_gelu=quick) if config is not None else _package_model_config(model_name)
  if config is None:
    raise UserInputError(
        f"Unknown open_clip model name {model_name!r}; known: {', '.join(OPEN_CLIP_CONFIGS)} (each "
        "also with -quickgelu), any name of an installed open_clip package, or a path to its config JSON.")
  return config, config.get("preprocess_cfg", {})


def _check_fixed(cfg: dict, fixed: dict, ignored, allowed, where: str) -> None:
  bad = []
  for key, value in cfg.items():
    if key in ignored or key in allowed:
      continue
    if key not in fixed:
      bad.append(f"{key}={value!r} (unknown)")
    elif value != fixed[key] and not (key == "block_type" and value == "default"):
      bad.append(f"{key}={value!r}")
  if bad:
    raise UserInputError(f"open_clip {where} uses features the CLIP-score towers do not implement: "
                         f"{', '.join(bad)}. Supported: the standard ViT CLIP (e.g. ViT-L-14, ViT-H-14).")


def _norm_eps(cfg: dict, where: str) -> float:
  kwargs = cfg.get("norm_kwargs") or {}
  if set(kwargs) - {"eps"}:
    raise UserInputError(f"open_clip {where}.norm_kwargs={kwargs} is not supported (only eps).")
  return float(kwargs.get("eps", 1e-5))


def open_clip_modules(config: dict, *, dtype: Any = jnp.float32
                      ) -> Tuple[CLIPVisionModelWithProjection, CLIPTextModelWithProjection]:
  """Our two towers for an open_clip model config (see `open_clip_config`)."""
  extra = set(config) - {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "preprocess_cfg",
                         *_TOP_IGNORED}
  if extra:
    raise UserInputError(f"open_clip model config has unsupported entries {sorted(extra)}.")
  act = "quick_gelu" if config.get("quick_gelu", False) else "gelu"
  vcfg, tcfg = dict(config["vision_cfg"]), dict(config["text_cfg"])
  _check_fixed(vcfg, _VISION_FIXED, _VISION_IGNORED,
               ("layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size",
                "norm_kwargs"), "vision_cfg")
  _check_fixed(tcfg, _TEXT_FIXED, _TEXT_IGNORED,
               ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio",
                "norm_kwargs", "pool_type", "eos_id"), "text_cfg")
  if not isinstance(vcfg.get("layers", 12), int):
    raise UserInputError("open_clip ModifiedResNet towers (vision_cfg.layers as a tuple) are not "
                         "supported; use a ViT model.")
  image_size = vcfg.get("image_size", 224)
  if isinstance(image_size, (list, tuple)):
    if len(set(image_size)) != 1:
      raise UserInputError(f"non-square open_clip image_size {image_size} is not supported.")
    image_size = image_size[0]
  width = vcfg.get("width", 768)
  vision = CLIPVisionModelWithProjection(
      image_size=image_size, patch_size=vcfg.get("patch_size", 16), hidden_size=width,
      intermediate_size=int(width * vcfg.get("mlp_ratio", 4.0)), num_hidden_layers=vcfg.get("layers", 12),
      num_attention_heads=width // vcfg.get("head_width", 64), hidden_act=act,
      layer_norm_eps=_norm_eps(vcfg, "vision_cfg"), projection_dim=config["embed_dim"],
      dtype=dtype, param_dtype=dtype)
  pool = tcfg.get("pool_type", "argmax")
  if pool == "argmax":
    eos_token_id = 2  # CLIPTextModel's legacy value: pool at the largest id, as open_clip's argmax
  elif pool == "eos" and tcfg.get("eos_id", 2) != 2:
    eos_token_id = tcfg["eos_id"]
  else:
    raise UserInputError(f"open_clip text_cfg.pool_type={pool!r} (eos_id={tcfg.get('eos_id')}) is "
                         "not supported; CLIP pools at the end-of-text token ('argmax').")
  twidth = tcfg.get("width", 512)
  text = CLIPTextModelWithProjection(
      vocab_size=tcfg.get("vocab_size", 49408), hidden_size=twidth,
      intermediate_size=int(twidth * tcfg.get("mlp_ratio", 4.0)),
      num_hidden_layers=tcfg.get("layers", 12), num_attention_heads=tcfg.get("heads", 8),
      max_position_embeddings=tcfg.get("context_length", 77), hidden_act=act,
      layer_norm_eps=_norm_eps(tcfg, "text_cfg"), eos_token_id=eos_token_id,
      projection_dim=config["embed_dim"], dtype=dtype, param_dtype=dtype)
  return vision, text


_BLOCK_RENAMES = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
                  ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj."))
_TOP_RENAMES = (
    ("visual.conv1.", "vision_model.embeddings.patch_embedding."),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("visual.ln_pre.", "vision_model.pre_layrnorm."),
    ("visual.ln_post.", "vision_model.post_layernorm."),
    ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
    ("token_embedding.", "text_model.embeddings.token_embedding."),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ("transformer.resblocks.", "text_model.encoder.layers."),
    ("ln_final.", "text_model.final_layer_norm."),
)
# Not parameters of the embeddings: the temperature/bias of the contrastive loss, the causal mask,
# and the scalars OpenAI's JIT archives carry.
_OPEN_CLIP_DROPPED = ("logit_scale", "logit_bias", "attn_mask", "input_resolution", "context_length",
                      "vocab_size")


def open_clip_to_transformers(state_dict: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Renames an open_clip CLIP state dict into transformers' `CLIPModel` layout.

  Unknown keys pass through unchanged, so the conversion that follows lists them as unexpected.
  """
  if state_dict and all(k.startswith("module.") for k in state_dict):
    state_dict = {k[len("module."):]: v for k, v in state_dict.items()}  # saved from DDP training
  out = {}
  for key, value in state_dict.items():
    if key in _OPEN_CLIP_DROPPED:
      continue
    if key == "visual.proj":
      out["visual_projection.weight"] = np.asarray(value).T
      continue
    if key == "text_projection":
      out["text_projection.weight"] = np.asarray(value).T
      continue
    for old, new in _TOP_RENAMES:
      if key.startswith(old):
        key = new + key[len(old):]
        break
    if ".encoder.layers." in key:
      prefix, rest = key.split(".encoder.layers.", 1)
      index, rest = rest.split(".", 1)
      block = f"{prefix}.encoder.layers.{index}."
      if rest.startswith("attn.in_proj_"):
        leaf = rest.rsplit("_", 1)[1]
        for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(np.asarray(value), 3, axis=0)):
          out[f"{block}self_attn.{name}.{leaf}"] = part
        continue
      for old, new in _BLOCK_RENAMES:
        if rest.startswith(old):
          rest = new + rest[len(old):]
          break
      key = block + rest
    out[key] = value
  return out


def _open_clip_files(path: str) -> Tuple[str, Optional[str]]:
  """(weights file, open_clip_config.json or None) of a file or directory."""
  if os.path.isfile(path):
    config = os.path.join(os.path.dirname(path), OPEN_CLIP_CONFIG_NAME)
    return path, config if os.path.isfile(config) else None
  for name in OPEN_CLIP_WEIGHT_NAMES:
    if os.path.isfile(os.path.join(path, name)):
      config = os.path.join(path, OPEN_CLIP_CONFIG_NAME)
      return os.path.join(path, name), config if os.path.isfile(config) else None
  raise InputFileError(f"No open_clip weights in {path!r}: expected one of {OPEN_CLIP_WEIGHT_NAMES}; "
                       f"found {sorted(os.listdir(path))}.")


def load_open_clip(path: str, model_name: Optional[str] = None, *, dtype: Any = jnp.float32,
                   allow_pickle: bool = False) -> ClipWeights:
  """Loads an open_clip CLIP checkpoint (see the module docstring)."""
  if not os.path.exists(path):
    raise MissingInputError(f"No open_clip weights at {path!r}. Expected {_EXPECTED}.")
  weights, config_file = _open_clip_files(path)
  if model_name is None and config_file is None:
    raise UserInputError(
        f"The open_clip checkpoint {weights!r} does not say its architecture: pass model_name "
        f"(one of {', '.join(OPEN_CLIP_CONFIGS)}, e.g. 'ViT-H-14' for laion2b_s32b_b79k) or the path "
        f"of its config JSON, or put {OPEN_CLIP_CONFIG_NAME} beside it.")
  config, preprocess = open_clip_config(model_name or config_file)
  vision, text = open_clip_modules(config, dtype=dtype)
  if preprocess.get("interpolation", "bicubic") != "bicubic" or \
      preprocess.get("resize_mode", "shortest") != "shortest":
    raise UserInputError(f"open_clip preprocess_cfg {preprocess} is not supported: the CLIP-score "
                         "preprocessing implements bicubic resizing of the shortest side.")
  state_dict = open_clip_to_transformers(load_state_dict(weights, allow_pickle=allow_pickle))
  vision_sd, text_sd = _split_towers(state_dict)
  vision_params, text_params = _convert(vision, text, vision_sd, text_sd,
                                        f"open_clip checkpoint {weights!r}")
  mean = tuple(preprocess.get("mean", OPENAI_CLIP_MEAN))
  std = tuple(preprocess.get("std", OPENAI_CLIP_STD))
  return ClipWeights("open_clip", vision, vision_params, text, text_params, mean, std, "half_even",
                     f"open_clip {model_name or config_file} {weights}")


@functools.lru_cache(maxsize=1)
def open_clip_bpe_path() -> Optional[str]:
  """open_clip's bundled BPE merges file (bpe_simple_vocab_16e6.txt.gz), found without importing
  open_clip (which imports torchvision); None when open_clip is not installed."""
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
  return path if os.path.isfile(path) else None
