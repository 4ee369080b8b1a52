"""One loader for every weight source: a path (and how to read it) -> networks or a model bundle.

  source = Source("/models/sd15")                        # kind detected from what is there
  bundle = load_bundle(source)                            # sampling, export, evaluation
  nets = load_networks(Source("workdirs/ae"), ["vae"])   # fine-tuning, frozen parts of stage 2

Kinds of source (`detect_kind`):
  workdir          a training workdir of ours (`checkpoints/`); `step` and `ema` choose the
                   params; only those arrays are read from the checkpoint.
  diffusers        a diffusers pipeline directory (`model_index.json`, or `unet/` / `vae/`):
                   a StableDiffusionPipeline, or an LDMTextToImagePipeline (`vqvae/` a VQModel,
                   `bert/` a CLIPTextModel).
  diffusers_model  one diffusers model directory: `config.json` of a UNet2DConditionModel,
                   AutoencoderKL or VQModel.
  transformers     a transformers CLIPTextModel directory (a frozen text encoder).
  single_file      an original-layout checkpoint (`.safetensors`; `.ckpt` with `allow_pickle`),
                   with `config_yaml` and `tokenizer` when they are not beside it.
  native           a directory written by `export --format native`.

ControlNets load through `load_controlnet` (not a bundle network: one base model takes any
number of them): a diffusers `ControlNetModel` directory (a diffusers_model source), a diffusers
ControlNet pipeline directory's `controlnet/`, an original-layout single file, whose layout is
the base UNet's, or a ControlNet training workdir of ours (training stage "controlnet").

Pickle files are refused unless `allow_pickle` (unpickling runs code from the file).
"""

import dataclasses
import json
import os
from typing import Any, Dict, NamedTuple, Optional, Sequence

import flax.linen as nn

from latent_diffusion_jax.artifacts import workdir as workdir_lib
from latent_diffusion_jax.checkpoints.checkpointer import checkpoint_dir
from latent_diffusion_jax.models.bundle import ModelBundle
from latent_diffusion_jax.core.errors import UserInputError, MissingInputError

KINDS = ("workdir", "diffusers", "diffusers_model", "transformers", "single_file", "native")
# The networks a bundle holds, by the names every consumer uses.
NETWORKS = ("unet", "vae", "text_encoder")
_DIFFUSERS_MODELS = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae", "VQModel": "vae",
                     "ControlNetModel": "controlnet"}


@dataclasses.dataclass(frozen=True)
class Source:
  """Where weights come from, and how to read them.

  Attributes:
    path: a directory or file (see the module docstring).
    kind: one of KINDS, or "auto" to detect it from what is at `path`.
    step: a workdir's checkpoint step; None for the latest.
    ema: a workdir's EMA params (when the run kept them) rather than the raw ones.
    config_yaml: a single file's inference yaml, when not beside it or in its header.
    tokenizer: a tokenizer directory for sources that have none of their own.
    allow_pickle: accept pickle weight files.
  """
  path: str
  kind: str = "auto"
  step: Optional[int] = None
  ema: bool = True
  config_yaml: Optional[str] = None
  tokenizer: Optional[str] = None
  allow_pickle: bool = False

  def resolved(self) -> "Source":
    """This source with `kind` detected; checks that the options fit the kind."""
    if not self.path:
      raise UserInputError("No weight source given (an empty path).")
    kind = detect_kind(self.path) if self.kind == "auto" else self.kind
    if kind not in KINDS:
      raise UserInputError(f"Unknown source kind {kind!r}; valid: auto, {', '.join(KINDS)}.")
    if self.config_yaml is not None and kind != "single_file":
      raise UserInputError(f"config_yaml only applies to single-file checkpoints; {self.path!r} is a "
                       f"{kind} source.")
    if self.step is not None and kind != "workdir":
      raise UserInputError(f"step only applies to training workdirs; {self.path!r} is a {kind} source.")
    return dataclasses.replace(self, kind=kind)

  def describe(self, step: Optional[int] = None) -> str:
    """One line for logs and settings files; `step` names the workdir step actually read."""
    text = f"{self.kind}:{self.path}"
    if self.kind == "workdir":
      step = self.step if step is None else step
      text += f" step={'latest' if step is None else step} ema={self.ema}"
    return text


class Network(NamedTuple):
  """A module and its host params."""
  module: nn.Module
  params: Any


class Networks(NamedTuple):
  """The networks a source holds (name -> Network) and the latent scale factor it records."""
  networks: Dict[str, Network]
  scaling_factor: Optional[float]


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def detect_kind(path: str) -> str:
  """The kind of source at `path` (one of KINDS).

  Raises:
    FileNotFoundError: nothing at `path`.
    ValueError: something this package cannot read; the message lists what it can.
  """
  if not os.path.exists(path):
    raise MissingInputError(f"No weights at {path!r}: no such file or directory.")
  if os.path.isfile(path):
    return "single_file"
  if checkpoint_dir(path).is_dir():
    return "workdir"
  config_path = os.path.join(path, "config.json")
  if os.path.isfile(config_path):
    config = _read_json(config_path)
    from latent_diffusion_jax.interop.native import FORMAT
    if config.get("format") == FORMAT:
      return "native"
    if config.get("_class_name") in _DIFFUSERS_MODELS:
      return "diffusers_model"
    if config.get("model_type") in ("clip_text_model", "clip") or "CLIPTextModel" in config.get(
        "architectures", ()):
      return "transformers"
  if os.path.isfile(os.path.join(path, "model_index.json")) or any(
      os.path.isdir(os.path.join(path, d)) for d in ("unet", "vae")):
    return "diffusers"
  raise UserInputError(
      f"{path!r} is none of: a training workdir of this package (checkpoints/), a diffusers "
      "pipeline directory (model_index.json, unet/, vae/), a diffusers UNet2DConditionModel / "
      "AutoencoderKL / VQModel / ControlNetModel directory (config.json with _class_name), a transformers "
      "CLIPTextModel directory, a single-file checkpoint (.safetensors), or a native export "
      "(config.json with format latent_diffusion_jax.native).")


def as_source(source: "Source | str") -> Source:
  return (Source(source) if isinstance(source, str) else source).resolved()


def load_bundle(source: "Source | str", *, dtype: Any = None,
                attention_impl: Optional[str] = None) -> ModelBundle:
  """The whole model (UNet, autoencoder, text encoder, tokenizer, settings) of `source`.

  Args:
    source: a `Source`, or a path whose kind is detected.
    dtype, attention_impl: runtime overrides for every network (None keeps the source's).

  Raises:
    ValueError: a source that holds no whole model (a single network's directory) or options
      that do not fit it.
  """
  source = as_source(source)
  overrides = {k: v for k, v in (("dtype", dtype), ("attention_impl", attention_impl))
               if v is not None}
  if source.kind == "workdir":
    bundle = workdir_lib.load_bundle(source.path, source.step, source.ema, **overrides)
  elif source.kind == "diffusers":
    from latent_diffusion_jax.interop.diffusers import load_pipeline
    bundle = load_pipeline(source.path, allow_pickle=source.allow_pickle, **overrides)
  elif source.kind == "single_file":
    from latent_diffusion_jax.interop.single_file import load_single_file
    bundle = load_single_file(source.path, config_yaml=source.config_yaml,
                              allow_pickle=source.allow_pickle, tokenizer_path=source.tokenizer,
                              **overrides)
  elif source.kind == "native":
    from latent_diffusion_jax.interop.native import load_native
    bundle = load_native(source.path, **overrides)
  else:
    raise UserInputError(f"{source.path!r} holds one {source.kind} network, not a whole model; give a "
                     "training workdir, a diffusers pipeline, a single file or a native export.")
  if source.tokenizer is not None and source.kind != "single_file":
    bundle.tokenizer_path = source.tokenizer
  bundle.metadata = {**bundle.metadata,
                     "source": source.describe(bundle.metadata.get("step"))}
  return bundle


def load_networks(source: "Source | str", wanted: Sequence[str], *, dtype: Any = None,
                  attention_impl: Optional[str] = None,
                  text_output_layer: Optional[str] = None) -> Networks:
  """The networks named in `wanted` (of NETWORKS) that `source` holds; missing ones are left out.

  Reads no more than needed: a workdir restores only the wanted trees, a diffusers pipeline reads
  only the wanted subdirectories.

  Args:
    source: a `Source`, or a path whose kind is detected.
    wanted: names from NETWORKS.
    dtype, attention_impl: runtime overrides (None keeps the source's).
    text_output_layer: a CLIP text encoder's output ("last" or "penultimate"), where the source
      does not say.
  """
  unknown = sorted(set(wanted) - set(NETWORKS))
  if unknown:
    raise UserInputError(f"Unknown networks {unknown}; valid: {', '.join(NETWORKS)}.")
  source = as_source(source)
  overrides = {k: v for k, v in (("dtype", dtype), ("attention_impl", attention_impl))
               if v is not None}
  text_kw = dict(overrides, **({"output_layer": text_output_layer} if text_output_layer else {}))
  kind, path, pickle_ok = source.kind, source.path, source.allow_pickle

  if kind == "workdir":
    if workdir_lib.run_kind(path) == workdir_lib.AUTOENCODER_KIND:
      if "vae" not in wanted:
        return Networks({}, None)
      module, params, scale = workdir_lib.load_first_stage(path, source.step, source.ema, **overrides)
      return Networks({"vae": Network(module, params)}, scale)
    bundle = workdir_lib.load_bundle(path, source.step, source.ema, networks=wanted, **overrides)
    return _from_bundle(bundle, wanted)
  if kind in ("single_file", "native"):
    return _from_bundle(load_bundle(source, **overrides), wanted)
  if kind == "transformers":
    if "text_encoder" not in wanted:
      return Networks({}, None)
    from latent_diffusion_jax.interop.clip import load_clip_text_model
    return Networks({"text_encoder": Network(*load_clip_text_model(
        path, allow_pickle=pickle_ok, **text_kw))}, None)

  from latent_diffusion_jax.interop import diffusers
  if kind == "diffusers_model":
    dirs = {_DIFFUSERS_MODELS[_read_json(os.path.join(path, "config.json"))["_class_name"]]: path}
    if "controlnet" in dirs:
      raise UserInputError(f"{path!r} holds a ControlNet, not one of {', '.join(wanted)}; load it "
                           "with load_controlnet (sample.py --controlnet).")
  else:  # both pipeline layouts: vae/ or vqvae/, text_encoder/ or bert/
    dirs = diffusers.component_dirs(path, NETWORKS)
  found, scale = {}, None
  if "unet" in wanted and "unet" in dirs:
    module, params, _ = diffusers.load_unet(dirs["unet"], allow_pickle=pickle_ok, **overrides)
    found["unet"] = Network(module, params)
  if "vae" in wanted and "vae" in dirs:
    # AutoencoderKL or VQModel, by the config's _class_name.
    module, params, cfg = diffusers.load_first_stage(dirs["vae"], allow_pickle=pickle_ok,
                                                     **overrides)
    found["vae"] = Network(module, params)
    scale = float(cfg["scaling_factor"]) if "scaling_factor" in cfg else None
  if "text_encoder" in wanted and "text_encoder" in dirs:
    from latent_diffusion_jax.interop.clip import load_clip_text_model
    diffusers.check_text_encoder_dir(dirs["text_encoder"])
    found["text_encoder"] = Network(*load_clip_text_model(
        dirs["text_encoder"], allow_pickle=pickle_ok, **text_kw))
  return Networks(found, scale)


def _from_bundle(bundle: ModelBundle, wanted: Sequence[str]) -> Networks:
  nets = {"unet": (bundle.unet, bundle.unet_params), "vae": (bundle.vae, bundle.vae_params),
          "text_encoder": (bundle.text_encoder, bundle.text_encoder_params)}
  return Networks({k: Network(*v) for k, v in nets.items()
                   if k in wanted and v[0] is not None and v[1] is not None},
                  float(bundle.scaling_factor))


def pipeline_parts(path: str, names: Sequence[str]) -> Dict[str, str]:
  """The subdirectories among `names` (vae, text_encoder, tokenizer, ...) of a diffusers pipeline
  directory at `path` (an LDMTextToImagePipeline's vqvae/ and bert/ under our names vae and
  text_encoder); empty for any other source."""
  if not path or not os.path.isfile(os.path.join(path, "model_index.json")):
    return {}
  from latent_diffusion_jax.interop.diffusers import component_dirs
  return component_dirs(path, names)


def load_controlnet(source: "Source | str", *, base_unet: Optional[nn.Module] = None,
                    dtype: Any = None, attention_impl: Optional[str] = None) -> Network:
  """A ControlNet and its host params, from a diffusers `ControlNetModel` directory, the
  `controlnet/` of a diffusers ControlNet pipeline directory, an original-layout single file, or
  a ControlNet training workdir (`step` and `ema` choose the params).

  Args:
    source: a `Source`, or a path whose kind is detected.
    base_unet: the UNet the ControlNet drives. A single file (which records no layout) takes its
      layout; every other source is checked against it (`models.controlnet.check_matches_unet`).
    dtype, attention_impl: runtime overrides (None keeps the source's; a single file takes the
      base UNet's).

  Raises:
    MissingInputError: nothing at the path, or a single file without `base_unet`.
    UserInputError: a source holding no ControlNet, or one whose layout does not fit `base_unet`
      (the message names the field).
  """
  from latent_diffusion_jax.interop import controlnet as interop
  from latent_diffusion_jax.models.controlnet import check_matches_unet
  source = as_source(source)
  overrides = {k: v for k, v in (("dtype", dtype), ("attention_impl", attention_impl))
               if v is not None}
  path = source.path
  if source.kind == "workdir":  # a ControlNet training run of ours (stage "controlnet")
    module, params, _ = workdir_lib.load_controlnet(path, source.step, source.ema, **overrides)
  elif source.kind == "single_file":
    module, params = interop.load_controlnet_single_file(path, base_unet,
                                                         allow_pickle=source.allow_pickle,
                                                         **overrides)
  elif source.kind in ("diffusers_model", "diffusers"):
    directory = path
    if source.kind == "diffusers":
      directory = os.path.join(path, "controlnet")
      if not os.path.isdir(directory):
        raise UserInputError(f"The diffusers pipeline {path!r} has no controlnet/ subdirectory.")
    module, params, _ = interop.load_controlnet_dir(directory, allow_pickle=source.allow_pickle,
                                                    **overrides)
  else:
    raise UserInputError(
        f"{path!r} is a {source.kind} source; ControlNets load from a diffusers ControlNetModel "
        "directory, a diffusers ControlNet pipeline (controlnet/), an original-layout file or a "
        "ControlNet training workdir.")
  if base_unet is not None:
    check_matches_unet(module, base_unet, what=f"The ControlNet {path!r}")
  return Network(module, params)
