"""The original Stable Diffusion inference yaml (v1-inference.yaml layout) from and to our modules.

Written: `model.target: ldm.models.diffusion.ddpm.LatentDiffusion` with the schedule, scale factor
and latent size, `unet_config` (openaimodel.UNetModel), `first_stage_config` (AutoencoderKL with its
ddconfig) and `cond_stage_config` (FrozenCLIPEmbedder or FrozenOpenCLIPEmbedder), plus a
`latent_diffusion_jax:` section for what the original cannot express. Read: the same layout, from
our exporter or from the yaml files that ship with SD 1.x / 2.x checkpoints.

Inpainting models (UNet input = latent + mask + masked-image latents, 9 channels for SD) use the
`sd-v1-5-inpainting` layout: `LatentInpaintDiffusion` with `conditioning_key: hybrid`.
"""

from typing import Any, Dict, Mapping, Optional

import numpy as np

from latent_diffusion_jax.interop.export_diffusers import ExportError
from latent_diffusion_jax.models import image_conditioning
from latent_diffusion_jax.models.autoencoder import AutoencoderKL
from latent_diffusion_jax.models.bundle import ModelBundle
from latent_diffusion_jax.models.text_encoders import CLIPTextModel
from latent_diffusion_jax.models.unet import UNet2DConditionModel, heads_per_level
from latent_diffusion_jax.core.errors import UserInputError

EXTRAS_KEY = "latent_diffusion_jax"
_CLIP_TARGET = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
_OPEN_CLIP_TARGET = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
_UNCONDITIONAL = "__is_unconditional__"
_INPAINT_TARGET = "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"
# ldm's make_beta_schedule names: its "linear" is linear in sqrt(beta), i.e. diffusers' scaled_linear.
_TO_LDM_SCHEDULE = {"scaled_linear": "linear", "linear": "sqrt_linear", "cosine": "cosine"}
_FROM_LDM_SCHEDULE = {v: k for k, v in _TO_LDM_SCHEDULE.items()}
_TO_LDM_PARAMETERIZATION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_FROM_LDM_PARAMETERIZATION = {v: k for k, v in _TO_LDM_PARAMETERIZATION.items()}
# open_clip architectures of the SD 2.x conditioner and their depth: the original code builds the
# tower from the arch and skips its last layer for layer="penultimate".
_OPEN_CLIP_DEPTH = {"ViT-H-14": 24, "ViT-bigG-14": 32}
_CLIP_EXTRA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "max_position_embeddings", "hidden_act",
                      "layer_norm_eps", "eos_token_id", "output_layer")


def _plain(value: Any) -> Any:
  """Tuples -> lists and numpy scalars -> Python, recursively, for yaml."""
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, np.generic):
    return value.item()
  return value


def _unet_params(bundle: ModelBundle) -> dict:
  unet = bundle.unet
  base = unet.block_out_channels[0]
  params = {
      "image_size": bundle.latent_size, "in_channels": unet.in_channels,
      "out_channels": unet.out_channels, "model_channels": base,
      "attention_resolutions": [2 ** i for i, a in enumerate(unet.attention_levels) if a],
      "num_res_blocks": unet.layers_per_block,
      "channel_mult": [c // base for c in unet.block_out_channels],
      "dropout": unet.dropout,
  }
  heads = heads_per_level(unet.block_out_channels, unet.num_heads, unet.head_dim)
  if unet.head_dim is None and isinstance(unet.num_heads, int):
    params["num_heads"] = unet.num_heads
  elif len({d for _, d in heads}) == 1:
    params["num_head_channels"] = heads[0][1]
  else:
    raise ExportError(f"Per-level head counts {unet.num_heads} with different head widths have no "
                      "original UNetModel setting (num_heads or num_head_channels).")
  params.update(use_spatial_transformer=True, transformer_depth=unet.transformer_depth,
                context_dim=unet.cross_attention_dim, use_checkpoint=False, legacy=False)
  # Only the SD 2 code base knows this argument; leaving it out keeps SD 1 yaml loadable by the
  # CompVis code, which reads a missing value as False like everyone else.
  if unet.use_linear_projection:
    params["use_linear_in_transformer"] = True
  if unet.only_cross_attention is not False:
    only = unet.only_cross_attention
    params["disable_self_attentions"] = ([bool(only)] * len(unet.block_out_channels)
                                         if isinstance(only, bool) else [bool(v) for v in only])
  if unet.num_class_embeds is not None:
    params["num_classes"] = unet.num_class_embeds
  return params


def _vae_params(bundle: ModelBundle) -> dict:
  vae = bundle.vae
  base = vae.block_out_channels[0]
  if any(c % base for c in vae.block_out_channels):
    raise ExportError(f"VAE block_out_channels {tuple(vae.block_out_channels)} are not multiples of "
                      "the first, so they have no original ch/ch_mult.")
  ddconfig = {
      "double_z": True, "z_channels": vae.latent_channels, "resolution": bundle.image_size,
      "in_channels": vae.in_channels, "out_ch": vae.out_channels, "ch": base,
      "ch_mult": [c // base for c in vae.block_out_channels],
      "num_res_blocks": vae.layers_per_block, "attn_resolutions": [], "dropout": 0.0,
  }
  if not vae.mid_block_attention:
    ddconfig["attn_type"] = "none"
  return {"embed_dim": vae.latent_channels, "monitor": "val/rec_loss", "ddconfig": ddconfig,
          "lossconfig": {"target": "torch.nn.Identity"}}


def _open_clip_layer(te: CLIPTextModel) -> str:
  # diffusers ships SD 2's 24-layer tower cut to 23 layers read at the last one; in the original
  # config that same computation is the full ViT-H tower read at its penultimate layer.
  cut_tower = te.hidden_size == 1024 and te.num_hidden_layers == _OPEN_CLIP_DEPTH["ViT-H-14"] - 1
  return "penultimate" if te.output_layer == "penultimate" or cut_tower else "last"


def _cond_stage(bundle: ModelBundle, layout: Optional[str]) -> Any:
  if layout is None:
    return _UNCONDITIONAL
  te = bundle.text_encoder
  if layout == "clip":
    return {"target": _CLIP_TARGET, "params": {"max_length": bundle.max_length}}
  params = {"freeze": True, "layer": _open_clip_layer(te), "max_length": bundle.max_length}
  if te.hidden_size == 1024:
    params.update(arch="ViT-H-14", version="laion2b_s32b_b79k")
  return {"target": _OPEN_CLIP_TARGET, "params": params}


def original_config(bundle: ModelBundle, text_layout: Optional[str]) -> dict:
  """The original inference config dict of `bundle` (see the module docstring).

  Args:
    bundle: the model.
    text_layout: "clip", "open_clip" or None (no text encoder).

  Returns:
    A dict ready for `write_yaml`.
  """
  from latent_diffusion_jax import __version__
  d = bundle.diffusion.to_dict()
  schedule = d.get("schedule", "scaled_linear")
  if schedule not in _TO_LDM_SCHEDULE:
    raise ExportError(f"Noise schedule {schedule!r} has no original (ldm) name.")
  unet, vae, te = bundle.unet, bundle.vae, bundle.text_encoder
  params = {
      "linear_start": float(d.get("beta_start", 0.00085)),
      "linear_end": float(d.get("beta_end", 0.012)),
      "beta_schedule": _TO_LDM_SCHEDULE[schedule],
      "num_timesteps_cond": 1, "log_every_t": 200, "timesteps": int(d.get("num_timesteps", 1000)),
      "first_stage_key": "jpg", "cond_stage_key": "txt",
      "image_size": bundle.latent_size, "channels": vae.latent_channels,
      "cond_stage_trainable": False, "conditioning_key": "crossattn",
      "monitor": "val/loss_simple_ema", "scale_factor": float(bundle.scaling_factor),
      "use_ema": False,
  }
  prediction = d.get("prediction_type", "epsilon")
  if prediction != "epsilon":
    params["parameterization"] = _TO_LDM_PARAMETERIZATION[prediction]
  params["unet_config"] = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                           "params": _unet_params(bundle)}
  params["first_stage_config"] = {"target": "ldm.models.autoencoder.AutoencoderKL",
                                  "params": _vae_params(bundle)}
  params["cond_stage_config"] = _cond_stage(bundle, text_layout)
  extras = {
      "version": __version__, "image_size": bundle.image_size, "max_length": bundle.max_length,
      "diffusion": dict(d),
      "unet": {"num_heads": unet.num_heads, "head_dim": unet.head_dim,
               "transformer_depth": unet.transformer_depth, "norm_num_groups": unet.norm_num_groups,
               "norm_eps": unet.norm_eps, "upcast_attention": unet.upcast_attention},
      "vae": {"norm_num_groups": vae.norm_num_groups, "use_quant_conv": vae.use_quant_conv,
              "mid_block_attention": vae.mid_block_attention},
  }
  if te is not None:
    extras["text_encoder"] = {f: getattr(te, f) for f in _CLIP_EXTRA_FIELDS}
  target = "ldm.models.diffusion.ddpm.LatentDiffusion"
  cond = bundle.image_conditioning
  if cond is not None:
    if cond.kind != "inpainting":
      raise ExportError(f"The single-file layout here holds text-to-image and inpainting models; "
                        f"this one has {cond.kind} conditioning. Export it with --format native "
                        "(or --format diffusers for an upscaler).")
    target = _INPAINT_TARGET
    params.update(conditioning_key="hybrid", finetune_keys=None)
  return _plain({"model": {"base_learning_rate": 1.0e-4, "target": target, "params": params},
                 EXTRAS_KEY: extras})


def write_yaml(config: Mapping[str, Any], path: str) -> str:
  import yaml
  with open(path, "w", encoding="utf-8") as f:
    yaml.safe_dump(_plain(dict(config)), f, sort_keys=False, default_flow_style=None)
  return path


def read_yaml(path: str) -> dict:
  import yaml
  with open(path, encoding="utf-8") as f:
    config = yaml.safe_load(f)
  if not isinstance(config, dict) or "model" not in config:
    raise UserInputError(f"{path} is no original Stable Diffusion config: it has no top-level 'model'.")
  return config


def _tuple(value: Any) -> Any:
  return tuple(value) if isinstance(value, list) else value


def _unet_from_original(p: Mapping[str, Any], extras: Mapping[str, Any],
                        overrides: Mapping[str, Any]) -> UNet2DConditionModel:
  base, mult = int(p["model_channels"]), [int(m) for m in p["channel_mult"]]
  if not isinstance(p.get("num_res_blocks", 2), int):
    raise UserInputError(f"Per-level num_res_blocks {p['num_res_blocks']} is not supported.")
  if p.get("num_classes") == "sequential":
    raise UserInputError("This is an SDXL-style UNet (num_classes: sequential); not supported.")
  resolutions = {int(r) for r in p.get("attention_resolutions", [])}
  attention_levels = tuple(2 ** i in resolutions for i in range(len(mult)))
  if any(attention_levels) and not p.get("use_spatial_transformer", False):
    raise UserInputError("UNetModel without use_spatial_transformer (self-attention only) is not "
                     "supported; this package's UNet uses cross-attention transformers.")
  head_channels = int(p.get("num_head_channels", -1))
  context_dim = p.get("context_dim")
  kwargs = dict(
      in_channels=int(p.get("in_channels", 4)), out_channels=int(p.get("out_channels", 4)),
      block_out_channels=tuple(base * m for m in mult), attention_levels=attention_levels,
      layers_per_block=int(p.get("num_res_blocks", 2)),
      num_heads=None if head_channels != -1 else int(p.get("num_heads", -1)),
      head_dim=head_channels if head_channels != -1 else None,
      transformer_depth=_tuple(p.get("transformer_depth", 1)),
      cross_attention_dim=int(context_dim[0] if isinstance(context_dim, list) else context_dim),
      use_linear_projection=bool(p.get("use_linear_in_transformer", False)),
      only_cross_attention=_tuple(p.get("disable_self_attentions") or False),
      num_class_embeds=p.get("num_classes"), dropout=float(p.get("dropout", 0.0)))
  kwargs.update({k: _tuple(v) for k, v in extras.items()})
  kwargs.update(overrides)
  return UNet2DConditionModel(**kwargs)


def _vae_from_original(p: Mapping[str, Any], extras: Mapping[str, Any],
                       overrides: Mapping[str, Any]) -> AutoencoderKL:
  dd = p["ddconfig"]
  if dd.get("attn_resolutions"):
    raise UserInputError(f"VAE attention at resolutions {dd['attn_resolutions']} is not supported "
                     "(only the mid-block attention is).")
  if not dd.get("double_z", True):
    raise UserInputError("A VAE with double_z: false (no variance output) is not supported.")
  if int(p.get("embed_dim", dd["z_channels"])) != int(dd["z_channels"]):
    raise UserInputError(f"VAE embed_dim {p['embed_dim']} != z_channels {dd['z_channels']} is not "
                     "supported.")
  kwargs = dict(
      in_channels=int(dd.get("in_channels", 3)), out_channels=int(dd.get("out_ch", 3)),
      block_out_channels=tuple(int(dd["ch"]) * int(m) for m in dd["ch_mult"]),
      layers_per_block=int(dd.get("num_res_blocks", 2)), latent_channels=int(dd["z_channels"]),
      mid_block_attention=dd.get("attn_type", "vanilla") != "none")
  kwargs.update(extras)
  kwargs.update(overrides)
  return AutoencoderKL(**kwargs)


def _text_from_original(cond: Any, text_sd: Mapping[str, Any], extras: Mapping[str, Any],
                        overrides: Mapping[str, Any]):
  """(module or None, layout or None) for the cond_stage_config."""
  if cond is None or cond == _UNCONDITIONAL or not text_sd and not extras:
    return None, None
  target = cond.get("target", "") if isinstance(cond, Mapping) else str(cond)
  params = (cond.get("params") or {}) if isinstance(cond, Mapping) else {}
  if target.endswith("FrozenOpenCLIPEmbedder"):
    layout, prefix = "open_clip", "cond_stage_model.model."
    token, position = prefix + "token_embedding.weight", prefix + "positional_embedding"
    fc1, layer_key = prefix + "transformer.resblocks.0.mlp.c_fc.weight", "resblocks."
  elif target.endswith("FrozenCLIPEmbedder"):
    layout, prefix = "clip", "cond_stage_model.transformer.text_model."
    token = prefix + "embeddings.token_embedding.weight"
    position = prefix + "embeddings.position_embedding.weight"
    fc1, layer_key = prefix + "encoder.layers.0.mlp.fc1.weight", "encoder.layers."
  else:
    raise UserInputError(f"Unsupported cond_stage_config target {target!r}; this package imports "
                     f"{_CLIP_TARGET} and {_OPEN_CLIP_TARGET}.")
  if extras:
    fields = dict(extras)
  else:
    missing = [k for k in (token, position, fc1) if k not in text_sd]
    if missing:
      raise UserInputError(f"The checkpoint lacks the text encoder weights {missing}.")
    vocab, width = np.shape(text_sd[token])
    depth = len({k.split(layer_key)[1].split(".")[0] for k in text_sd if layer_key in k})
    fields = dict(vocab_size=vocab, hidden_size=width, intermediate_size=np.shape(text_sd[fc1])[0],
                  num_hidden_layers=depth, max_position_embeddings=np.shape(text_sd[position])[0],
                  # Every SD conditioner (ViT-L/14, ViT-H/14) attends in 64-wide heads.
                  num_attention_heads=width // 64,
                  hidden_act="gelu" if layout == "open_clip" else "quick_gelu", eos_token_id=2,
                  output_layer="last")
    if layout == "clip" and params.get("layer", "last") != "last":
      raise UserInputError(f"FrozenCLIPEmbedder layer {params['layer']!r} is not supported; only 'last'.")
    if layout == "open_clip" and params.get("layer", "last") == "penultimate":
      arch_depth = _OPEN_CLIP_DEPTH.get(params.get("arch", "ViT-H-14"), depth)
      # The original runs arch_depth - 1 layers; a tower stored without its last layer runs whole.
      fields["output_layer"] = "last" if depth == arch_depth - 1 else "penultimate"
  text_overrides = {k: v for k, v in overrides.items()
                    if k in ("dtype", "param_dtype", "attention_impl")}
  return CLIPTextModel(**{**fields, **text_overrides}), layout


def modules_from_original(original: Mapping[str, Any], text_sd: Mapping[str, Any],
                          **overrides) -> Dict[str, Any]:
  """Builds modules and settings from an original inference config.

  Args:
    original: the parsed yaml.
    text_sd: the checkpoint's `cond_stage_model.*` tensors (their shapes size the text encoder
      when the config carries no `latent_diffusion_jax` section).
    **overrides: module field overrides (dtype, attention_impl, ...).

  Returns:
    Dict with unet, vae, text_encoder, text_layout, scaling_factor, diffusion, image_size,
    max_length, metadata.
  """
  mp = original["model"]["params"]
  if "unet_config" not in mp:
    raise UserInputError("The config has no model.params.unet_config (SDXL-style 'network_config' "
                     "configs are not supported).")
  extras = original.get(EXTRAS_KEY) or {}
  unet = _unet_from_original(mp["unet_config"]["params"], extras.get("unet", {}), overrides)
  if "AutoencoderKL" not in mp["first_stage_config"].get("target", "AutoencoderKL"):
    raise UserInputError(f"Unsupported first stage {mp['first_stage_config']['target']!r}; only "
                     "AutoencoderKL.")
  vae = _vae_from_original(mp["first_stage_config"]["params"], extras.get("vae", {}), overrides)
  text, layout = _text_from_original(mp.get("cond_stage_config"), text_sd,
                                     extras.get("text_encoder", {}), overrides)
  schedule = mp.get("beta_schedule", "linear")
  if schedule not in _FROM_LDM_SCHEDULE:
    raise UserInputError(f"Unsupported beta_schedule {schedule!r}; valid: {sorted(_FROM_LDM_SCHEDULE)}.")
  diffusion = {
      "schedule": _FROM_LDM_SCHEDULE[schedule], "num_timesteps": int(mp.get("timesteps", 1000)),
      # ldm's DDPM defaults, for configs that leave them out.
      "beta_start": float(mp.get("linear_start", 1e-4)), "beta_end": float(mp.get("linear_end", 2e-2)),
      "rescale_zero_terminal_snr": False,
      "prediction_type": _FROM_LDM_PARAMETERIZATION[mp.get("parameterization", "eps")],
  }
  diffusion.update(extras.get("diffusion", {}))
  cond_params = (mp.get("cond_stage_config") or {})
  cond_params = cond_params.get("params") or {} if isinstance(cond_params, Mapping) else {}
  latent_size = int(mp.get("image_size", 64))
  conditioning = image_conditioning.infer(unet.in_channels, vae.latent_channels)
  if conditioning is not None and "Inpaint" not in original["model"].get("target", ""):
    raise UserInputError(
        f"The UNet takes {unet.in_channels} input channels (the inpainting layout) but the config's "
        f"model.target is {original['model'].get('target')!r}, not LatentInpaintDiffusion.")
  return {
      "image_conditioning": conditioning,
      "unet": unet, "vae": vae, "text_encoder": text, "text_layout": layout,
      "scaling_factor": float(mp.get("scale_factor", 1.0)), "diffusion": diffusion,
      "image_size": int(extras.get("image_size", latent_size * vae.downsample_factor)),
      "max_length": int(extras.get("max_length", cond_params.get("max_length", 77))),
      "metadata": {"exported_by": f"latent_diffusion_jax {extras['version']}"}
      if "version" in extras else {},
  }

