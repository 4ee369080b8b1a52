"""Writes a ModelBundle as a diffusers pipeline directory (safetensors only).

A KL model becomes a `StableDiffusionPipeline` directory; it loads offline in PyTorch with
`StableDiffusionPipeline.from_pretrained(out_dir, local_files_only=True)`. A VQ model (the LDM
paper's VQ-f4 family) becomes an `LDMTextToImagePipeline` directory (vqvae/, bert/ holding the CLIP
text encoder, tokenizer/, unet/, scheduler/): the diffusers pipeline whose `vqvae` may be a
`VQModel`, and which decodes through the quantizer (`VQModel.decode`) as our sampler does;
StableDiffusionPipeline cannot hold one (it calls `vae.decode(..., generator=...)`, which
`VQModel.decode` does not take). Load it with `DiffusionPipeline.from_pretrained(out_dir,
local_files_only=True)`. That pipeline's `__call__` pads prompts to 77 tokens and sizes latents
as height // 8, whatever the model: call it with height = width = 8 * latent size (or pass
`latents`), and with a text encoder of 77 positions; its components work at any size. Both
layouts load back into JAX with `interop.diffusers.load_pipeline(out_dir)`.

The helpers here (dtype casts, safetensors writing with header metadata, tokenizer copies) are
shared by the single-file and native exporters.
"""

import json
import os
import shutil
from typing import Any, Dict, Mapping, Optional

from absl import logging
import ml_dtypes
import numpy as np

from latent_diffusion_jax.interop.clip import clip_params_to_torch
from latent_diffusion_jax.interop.convert import flax_to_torch
from latent_diffusion_jax.interop.diffusers_config import (unet_to_diffusers_config,
                                                           vae_to_diffusers_config,
                                                           vq_to_diffusers_config)
from latent_diffusion_jax.diffusion.spec import DiffusionSpec
from latent_diffusion_jax.models.bundle import ModelBundle
from latent_diffusion_jax.core.errors import UserInputError, MissingInputError

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
# Our sampler names -> the diffusers scheduler that reproduces them (diffusion/samplers.py).
SCHEDULERS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler",
              "dpmpp_2m": "DPMSolverMultistepScheduler"}
# Our schedule names -> diffusers' beta_schedule names.
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
# The pipeline class and component directory names per first-stage kind (bundle.first_stage_kind).
PIPELINES = {"kl": "StableDiffusionPipeline", "vq": "LDMTextToImagePipeline"}
COMPONENT_DIRS = {"kl": {"vae": "vae", "text_encoder": "text_encoder"},
                   "vq": {"vae": "vqvae", "text_encoder": "bert"}}
# Prompt length LDMTextToImagePipeline.__call__ pads to.
_LDM_PIPELINE_MAX_LENGTH = 77


class ExportError(UserInputError):
  """Raised when a bundle cannot be written in the requested format; the message says which can."""


def numpy_dtype(name: str) -> Any:
  """The numpy dtype of a dtype name ("float32", "float16" or "bfloat16")."""
  if name not in DTYPES:
    raise UserInputError(f"Unknown export dtype {name!r}; valid: {', '.join(DTYPES)}.")
  return DTYPES[name]


def cast_state_dict(state_dict: Mapping[str, np.ndarray], dtype: str) -> Dict[str, np.ndarray]:
  """Casts the floating-point arrays of a state dict to `dtype`; integer buffers keep theirs."""
  target = numpy_dtype(dtype)
  out = {}
  for key, value in state_dict.items():
    value = np.asarray(value)
    is_float = np.issubdtype(value.dtype, np.floating) or value.dtype == ml_dtypes.bfloat16
    out[key] = np.ascontiguousarray(value.astype(target) if is_float else value)
  return out


def header_metadata(bundle: ModelBundle, config: Optional[dict] = None,
                    **extra: Any) -> Dict[str, str]:
  """The string-to-string metadata written into every safetensors header we produce.

  Args:
    bundle: provides the training step, training config and provenance (`bundle.metadata`).
    config: the config describing the tensors in the file (stored as JSON under "config").
    **extra: further entries; non-strings are stored as JSON.

  Returns:
    Header metadata: format, latent_diffusion_jax_version, config, and when known step,
    training_config and provenance. "format": "pt" is what transformers requires to read the file.
  """
  from latent_diffusion_jax import __version__
  meta = {"format": "pt", "latent_diffusion_jax_version": __version__}
  if config is not None:
    meta["config"] = json.dumps(config, sort_keys=True)
  provenance = dict(bundle.metadata)
  step = provenance.pop("step", None)
  if step is not None:
    meta["step"] = str(int(step))
  training_config = provenance.pop("config", None)
  if training_config is not None:
    meta["training_config"] = (training_config if isinstance(training_config, str)
                               else json.dumps(training_config, sort_keys=True, default=str))
  if provenance:
    meta["provenance"] = json.dumps(provenance, sort_keys=True, default=str)
  for key, value in extra.items():
    meta[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
  return meta


def save_safetensors(state_dict: Mapping[str, np.ndarray], path: str,
                     metadata: Dict[str, str]) -> str:
  """Writes numpy arrays (bfloat16 included) to a safetensors file; returns the path."""
  from safetensors.numpy import save_file
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path, metadata=metadata)
  return path


def copy_tokenizer(source: str, dest: str, max_length: Optional[int] = None) -> str:
  """Copies a tokenizer directory's files; `max_length` overrides its model_max_length.

  PyTorch pipelines pad prompts to the tokenizer's model_max_length, so it must equal the text
  encoder's sequence length or prompts come out longer than its learned positions.
  """
  if not os.path.isdir(source):
    raise MissingInputError(f"The bundle's tokenizer directory {source!r} does not exist.")
  os.makedirs(dest, exist_ok=True)
  for name in sorted(os.listdir(source)):
    if os.path.isfile(os.path.join(source, name)):
      shutil.copyfile(os.path.join(source, name), os.path.join(dest, name))
  config_path = os.path.join(dest, "tokenizer_config.json")
  if max_length is not None and os.path.isfile(config_path):
    with open(config_path) as f:
      config = json.load(f)
    if config.get("model_max_length") != max_length:
      config["model_max_length"] = max_length
      write_json(config_path, config)
  return dest


def scheduler_config(diffusion: DiffusionSpec, scheduler: str = "ddim") -> dict:
  """The diffusers scheduler_config.json of the training schedule, with SD's sampling settings.

  The spacing settings are those `sampling.generate` uses (SD's: DDIM/DDPM "leading" with
  steps_offset=1 and set_alpha_to_one=False, DPM-Solver++ "linspace"), overridden like there by
  the sampling settings `diffusion` pins, so that the exported pipeline samples what our sampler
  samples.

  Args:
    diffusion: the model's diffusion description.
    scheduler: "ddim", "ddpm" or "dpmpp_2m" (DPM-Solver++ 2M).

  Returns:
    A config dict for the matching diffusers scheduler class.
  """
  if scheduler not in SCHEDULERS:
    raise UserInputError(f"Unknown scheduler {scheduler!r}; valid: {', '.join(SCHEDULERS)}.")
  kind = diffusion.schedule
  pinned = diffusion.scheduler_overrides()
  if kind not in _BETA_SCHEDULES:
    raise ExportError(f"Noise schedule {kind!r} has no diffusers equivalent; "
                      f"valid: {', '.join(_BETA_SCHEDULES)}.")
  cfg = {
      "_class_name": SCHEDULERS[scheduler],
      "num_train_timesteps": int(diffusion.num_timesteps),
      "beta_start": float(diffusion.beta_start),
      "beta_end": float(diffusion.beta_end),
      "beta_schedule": _BETA_SCHEDULES[kind],
      "trained_betas": None,
      "prediction_type": diffusion.prediction_type,
      "rescale_betas_zero_snr": bool(diffusion.rescale_zero_terminal_snr),
      "timestep_spacing": pinned.get("timestep_spacing",
                                     "linspace" if scheduler == "dpmpp_2m" else "leading"),
      "steps_offset": int(pinned.get("steps_offset", 1)),
  }
  if scheduler == "ddim":
    cfg.update(clip_sample=False, set_alpha_to_one=bool(pinned.get("set_alpha_to_one", False)))
  elif scheduler == "ddpm":
    cfg.update(clip_sample=False, variance_type="fixed_small")
  else:
    cfg.update(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
               lower_order_final=True, final_sigmas_type="zero")
  return cfg


# Pipeline classes of image-conditioned KL models (bundle.image_conditioning.kind).
CONDITIONED_PIPELINES = {"inpainting": "StableDiffusionInpaintPipeline",
                         "upscaling": "StableDiffusionUpscalePipeline"}


def pipeline_class(bundle: ModelBundle) -> str:
  """The diffusers pipeline class a directory of `bundle` is written as."""
  cond = bundle.image_conditioning
  if cond is None:
    return PIPELINES[bundle.first_stage_kind]
  if cond.kind not in CONDITIONED_PIPELINES:
    raise ExportError(f"diffusers has no pipeline for {cond.kind} conditioning; export it with "
                      "--format native (export_native), which keeps it.")
  if bundle.first_stage_kind != "kl":
    raise ExportError(f"{CONDITIONED_PIPELINES[cond.kind]} needs an AutoencoderKL first stage; "
                      "this model's is a VQModel. Export it with --format native.")
  return CONDITIONED_PIPELINES[cond.kind]


def check_diffusers_compatible(bundle: ModelBundle) -> None:
  """Raises ExportError when a pipeline directory cannot hold the bundle."""
  from latent_diffusion_jax.models.text_encoders import CLIPTextModel
  pipeline = pipeline_class(bundle)
  if bundle.conditioner is not None:
    raise ExportError(
        f"This model is conditioned by a {bundle.conditioner.kind!r} conditioner, not text; a "
        f"{pipeline} directory cannot hold it. Class-conditional models export as diffusers "
        "components with interop.export_class_diffusers.export_class_conditional (the export "
        "command's --format diffusers does this); others with --format native.")
  if bundle.text_encoder is None:
    raise ExportError(
        f"This model has no text encoder; a {pipeline} directory needs a CLIP text "
        "encoder. Export it with --format native (export_native) instead.")
  if not isinstance(bundle.text_encoder, CLIPTextModel):
    raise ExportError(
        f"The text encoder is a {type(bundle.text_encoder).__name__} (the LDM paper's jointly "
        "trained conditioner), which diffusers and transformers have no class for (diffusers' "
        f"LDMBertModel is another network), so no {pipeline} directory can hold it. Export it "
        "with --format native (export_native), which keeps every network in our own layout.")
  if bundle.tokenizer_path is None:
    raise ExportError(
        "The bundle has no tokenizer (tokenizer_path is None), and a diffusers pipeline directory "
        "must include one. Set bundle.tokenizer_path to a local CLIP tokenizer directory (on the "
        "command line: --tokenizer DIR with --from_single_file).")


def text_encoder_for_export(bundle: ModelBundle) -> tuple:
  """(transformers config dict, state dict) of the bundle's CLIP text encoder.

  transformers' CLIPTextModel always returns the last layer. A "penultimate" encoder is written
  the way diffusers ships SD 2.x: without its last layer, whose output that encoder never uses.
  """
  te = bundle.text_encoder
  hf_config = te.to_hf_config()
  state_dict = clip_params_to_torch(bundle.text_encoder_params)
  if te.output_layer == "penultimate":
    last = f"text_model.encoder.layers.{te.num_hidden_layers - 1}."
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(last)}
    hf_config["num_hidden_layers"] = te.num_hidden_layers - 1
  return hf_config, state_dict


def _special_token_ids(tokenizer_path: str) -> Dict[str, int]:
  """bos/pad ids of the tokenizer; transformers' CLIP defaults (49406, 1) need not exist in it."""
  from latent_diffusion_jax.data.tokenizers import load_tokenizer
  tokenizer = load_tokenizer(tokenizer_path)
  ids = {"bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id}
  return {k: int(v) for k, v in ids.items() if v is not None}


def export_diffusers(bundle: ModelBundle, out_dir: str, *, dtype: str = "float32",
                     scheduler: str = "ddim") -> Dict[str, str]:
  """Writes `bundle` as a diffusers StableDiffusionPipeline directory, or for a VQ first stage as
  an LDMTextToImagePipeline directory (see the module docstring).

  Args:
    bundle: the model; its text encoder must be a `CLIPTextModel` and it needs a tokenizer.
    out_dir: the directory to create (existing files in it are overwritten).
    dtype: "float32", "float16" or "bfloat16" for every weight file.
    scheduler: the scheduler class written to scheduler/ ("ddim", "ddpm" or "dpmpp_2m"); its
      betas and prediction type are always those of the training schedule.

  Returns:
    Component name -> path written (unet, vae, text_encoder, tokenizer, scheduler, model_index);
    for a VQ model "vae" is the vqvae/ directory and "text_encoder" the bert/ one.

  Raises:
    ExportError: the bundle has no diffusers equivalent (no CLIP text encoder or no tokenizer);
      the message points to the native format.

  A class-conditional bundle whose classes reach the UNet only through its class embedding is
  written as diffusers components by interop/export_class_diffusers.py (the export command
  picks it).
  """
  check_diffusers_compatible(bundle)
  numpy_dtype(dtype)
  sched_cfg = scheduler_config(bundle.diffusion, scheduler)
  kind = bundle.first_stage_kind
  dirs = COMPONENT_DIRS[kind]
  if kind == "vq" and bundle.max_length != _LDM_PIPELINE_MAX_LENGTH:
    logging.warning("LDMTextToImagePipeline.__call__ pads prompts to %d tokens, but this text "
                    "encoder takes %d: call its components (or our sampler) instead of the "
                    "pipeline.", _LDM_PIPELINE_MAX_LENGTH, bundle.max_length)
  os.makedirs(out_dir, exist_ok=True)
  written = {}

  unet_cfg = unet_to_diffusers_config(bundle.unet, bundle.latent_size)
  if kind == "vq":
    vae_cfg = vq_to_diffusers_config(bundle.vae, bundle.image_size, bundle.scaling_factor)
  else:
    vae_cfg = vae_to_diffusers_config(bundle.vae, bundle.image_size, bundle.scaling_factor)
  text_cfg, text_sd = text_encoder_for_export(bundle)
  text_cfg.update(_special_token_ids(bundle.tokenizer_path))
  parts = (
      ("unet", "unet", unet_cfg, flax_to_torch(bundle.unet_params),
       "diffusion_pytorch_model.safetensors"),
      ("vae", dirs["vae"], vae_cfg, flax_to_torch(bundle.vae_params),
       "diffusion_pytorch_model.safetensors"),
      ("text_encoder", dirs["text_encoder"], text_cfg, text_sd, "model.safetensors"),
  )
  written.update(write_components(bundle, out_dir, parts, dtype))

  written["tokenizer"] = copy_tokenizer(bundle.tokenizer_path, os.path.join(out_dir, "tokenizer"),
                                        bundle.max_length)
  os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
  written["scheduler"] = os.path.join(out_dir, "scheduler", "scheduler_config.json")
  write_json(written["scheduler"], sched_cfg)
  written["model_index"] = os.path.join(out_dir, "model_index.json")
  if kind == "vq":
    write_json(written["model_index"], {
        "_class_name": PIPELINES["vq"],
        "vqvae": ["diffusers", "VQModel"],
        "bert": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", sched_cfg["_class_name"]],
    })
    return written
  index = {
      "_class_name": pipeline_class(bundle),
      "unet": ["diffusers", "UNet2DConditionModel"],
      "vae": ["diffusers", "AutoencoderKL"],
      "text_encoder": ["transformers", "CLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"],
      "scheduler": ["diffusers", sched_cfg["_class_name"]],
      "safety_checker": [None, None],
      "feature_extractor": [None, None],
  }
  cond = bundle.image_conditioning
  if cond is not None and cond.kind == "upscaling":
    # The upscaler's noise augmentation: a DDPMScheduler that only ever adds noise.
    low_res_cfg = dict(scheduler_config(cond.noise, "ddpm"))
    written["low_res_scheduler"] = os.path.join(out_dir, "low_res_scheduler",
                                                "scheduler_config.json")
    os.makedirs(os.path.dirname(written["low_res_scheduler"]), exist_ok=True)
    write_json(written["low_res_scheduler"], low_res_cfg)
    index.update(low_res_scheduler=["diffusers", "DDPMScheduler"], watermarker=[None, None],
                 max_noise_level=int(cond.max_noise_level))
  else:
    index.update(image_encoder=[None, None], requires_safety_checker=False)
  write_json(written["model_index"], index)
  return written


def write_components(bundle: ModelBundle, out_dir: str, parts, dtype: str) -> Dict[str, str]:
  """Writes (name, subdir, config, state dict, filename) parts as diffusers/transformers
  component directories; returns name -> directory."""
  written = {}
  for name, subdir, cfg, state_dict, filename in parts:
    sub = os.path.join(out_dir, subdir)
    os.makedirs(sub, exist_ok=True)
    write_json(os.path.join(sub, "config.json"), cfg)
    save_safetensors(cast_state_dict(state_dict, dtype), os.path.join(sub, filename),
                     header_metadata(bundle, cfg))
    written[name] = sub
  return written


def write_json(path: str, value: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")
