"""Our own export format: one safetensors file per network in our Flax layout, plus config.json.

It holds any ModelBundle, including the ones diffusers cannot express (the LDM paper's jointly
trained `LDMTextTransformer`, unconditional models), with a KL (`AutoencoderKL`) or VQ (`VQModel`)
first stage, and loads back bit-identically:

  out_dir/config.json              module fields of each network, diffusion settings, version
  out_dir/unet.safetensors         flat keys "down_blocks_0/resnets_0/conv1/kernel", Flax layouts
  out_dir/vae.safetensors
  out_dir/text_encoder.safetensors (when the model has one)
  out_dir/conditioner.safetensors  (a trained non-text conditioner: class labels, layouts, a
                                   user's; config.json's "conditioner" rebuilds it)
  out_dir/tokenizer/               (when the bundle has one)
"""

import dataclasses
import json
import os
from typing import Any, Dict, Optional

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion_jax.interop.convert import WeightImportError
from latent_diffusion_jax.interop.diffusers import abstract_unet_params, abstract_vae_params
from latent_diffusion_jax.interop.export_diffusers import (cast_state_dict, copy_tokenizer,
                                                           header_metadata, save_safetensors)
from latent_diffusion_jax.interop.files import load_state_dict
from latent_diffusion_jax.models.autoencoder import AutoencoderKL
from latent_diffusion_jax.diffusion.spec import DiffusionSpec
from latent_diffusion_jax.models.bundle import ModelBundle
from latent_diffusion_jax.models.text_encoders import CLIPTextModel, LDMTextTransformer
from latent_diffusion_jax.models.unet import UNet2DConditionModel
from latent_diffusion_jax.models.vq import VQModel
from latent_diffusion_jax.core.parallel import unbox
from latent_diffusion_jax.core.errors import UserInputError, MissingInputError

FORMAT = "latent_diffusion_jax.native"
_CLASSES = {cls.__name__: cls for cls in
            (UNet2DConditionModel, AutoencoderKL, VQModel, CLIPTextModel, LDMTextTransformer)}
_DTYPE_FIELDS = ("dtype", "param_dtype")
_NETWORKS = ("unet", "vae", "text_encoder")


def module_config(module: nn.Module) -> Dict[str, Any]:
  """{"class": name, "fields": {...}} of a module, JSON-ready (dtypes as names)."""
  name = type(module).__name__
  if name not in _CLASSES:
    raise UserInputError(f"The native format does not know module class {name!r}; "
                     f"known: {sorted(_CLASSES)}.")
  fields = {}
  for f in dataclasses.fields(module):
    if f.name in ("parent", "name"):
      continue
    value = getattr(module, f.name)
    fields[f.name] = np.dtype(value).name if f.name in _DTYPE_FIELDS else value
  return {"class": name, "fields": fields}


def module_from_config(config: Dict[str, Any], **overrides) -> nn.Module:
  """Inverse of `module_config`; `overrides` replace fields (e.g. dtype, attention_impl)."""
  if config["class"] not in _CLASSES:
    raise UserInputError(f"Unknown module class {config['class']!r} in a native config; "
                     f"known: {sorted(_CLASSES)}.")
  fields = {}
  for key, value in config["fields"].items():
    if key in _DTYPE_FIELDS:
      value = jnp.dtype(value)
    elif isinstance(value, list):
      value = tuple(value)
    fields[key] = value
  fields.update(overrides)
  return _CLASSES[config["class"]](**fields)


def _flat(params: Any) -> Dict[str, np.ndarray]:
  params = unbox(params)
  return {"/".join(path): np.asarray(value)
          for path, value in traverse_util.flatten_dict(params).items()}


def export_native(bundle: ModelBundle, out_dir: str, *, dtype: Optional[str] = None) -> Dict[str, str]:
  """Writes `bundle` in the native format (see the module docstring).

  Args:
    bundle: any ModelBundle.
    out_dir: the directory to create.
    dtype: cast weights to "float32", "float16" or "bfloat16"; None keeps each param's dtype.

  Returns:
    Name -> path of everything written (config, unet, vae[, text_encoder][, tokenizer]).
  """
  from latent_diffusion_jax import __version__
  os.makedirs(out_dir, exist_ok=True)
  networks = {"unet": (bundle.unet, bundle.unet_params), "vae": (bundle.vae, bundle.vae_params)}
  if bundle.text_encoder is not None:
    networks["text_encoder"] = (bundle.text_encoder, bundle.text_encoder_params)
  config = {
      "format": FORMAT, "version": __version__,
      "networks": {name: module_config(module) for name, (module, _) in networks.items()
                   if module is not None},
      "diffusion": bundle.diffusion.to_dict(), "scaling_factor": float(bundle.scaling_factor),
      "image_size": int(bundle.image_size), "max_length": int(bundle.max_length),
      "metadata": json.loads(json.dumps(bundle.metadata, default=str)),
  }
  conditioner = bundle.conditioner
  if conditioner is not None:
    if not conditioner.config:
      raise UserInputError(f"The bundle's {conditioner.kind!r} conditioner carries no config "
                           "(build it with models.build.build_conditioner) and cannot be exported.")
    config["conditioner"] = json.loads(conditioner.config)
    if bundle.conditioner_params:
      networks["conditioner"] = (None, bundle.conditioner_params)
  written = {"config": os.path.join(out_dir, "config.json")}
  with open(written["config"], "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write("\n")
  for name, (module, params) in networks.items():
    tensors = _flat(params)
    if dtype is not None:
      tensors = cast_state_dict(tensors, dtype)
    described = config["networks"].get(name, config.get("conditioner"))
    written[name] = save_safetensors(tensors, os.path.join(out_dir, f"{name}.safetensors"),
                                     header_metadata(bundle, described))
  if bundle.tokenizer_path is not None:
    written["tokenizer"] = copy_tokenizer(bundle.tokenizer_path, os.path.join(out_dir, "tokenizer"),
                                          bundle.max_length)
  return written


def _abstract(name: str, module: nn.Module, max_length: int) -> Any:
  if name == "unet":
    return abstract_unet_params(module)
  if name == "vae":
    return abstract_vae_params(module)
  ids = jnp.zeros((1, max_length), jnp.int32)
  return jax.eval_shape(module.init, jax.random.key(0), ids)["params"]


def _load_params(path: str, reference: Any, what: str) -> Any:
  tensors = load_state_dict(path)
  expected = {"/".join(p): v for p, v in traverse_util.flatten_dict(unbox(reference)).items()}
  missing = sorted(set(expected) - set(tensors))
  unexpected = sorted(set(tensors) - set(expected))
  mismatched = sorted(f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
                      for k in set(tensors) & set(expected)
                      if tuple(tensors[k].shape) != tuple(expected[k].shape))
  if missing or unexpected or mismatched:
    raise WeightImportError(
        f"The weights of {what} do not fit the module in its config.json: "
        f"missing {missing[:20]}, unexpected {unexpected[:20]}, shape mismatches {mismatched[:20]}.")
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in tensors.items()})


def load_native(out_dir: str, **overrides) -> ModelBundle:
  """Loads a directory written by `export_native`.

  Args:
    out_dir: the directory.
    **overrides: module field overrides (e.g. dtype, attention_impl), applied to every network
      that has the field.

  Returns:
    The bundle; params are host numpy arrays exactly as stored.
  """
  path = os.path.join(out_dir, "config.json")
  if not os.path.isfile(path):
    raise MissingInputError(f"No native export at {out_dir!r}: {path} does not exist.")
  with open(path) as f:
    config = json.load(f)
  if config.get("format") != FORMAT:
    raise UserInputError(f"{path} is not a native export config (format {config.get('format')!r}, "
                     f"expected {FORMAT!r}).")
  modules, params = {}, {}
  for name in _NETWORKS:
    if name not in config["networks"]:
      modules[name] = params[name] = None
      continue
    net = config["networks"][name]
    applicable = {k: v for k, v in overrides.items() if k in net["fields"]}
    modules[name] = module_from_config(net, **applicable)
    reference = _abstract(name, modules[name], config["max_length"])
    params[name] = _load_params(os.path.join(out_dir, f"{name}.safetensors"), reference,
                                f"the {name} in {out_dir}")
  conditioner, conditioner_params = None, None
  if "conditioner" in config:
    from latent_diffusion_jax.models.build import conditioner_from_config
    dtype = overrides.get("dtype")
    conditioner = conditioner_from_config(
        json.dumps(config["conditioner"]), attention_impl=overrides.get("attention_impl"),
        dtype=None if dtype is None else jnp.dtype(dtype).name)
    path = os.path.join(out_dir, "conditioner.safetensors")
    if conditioner.trainable and conditioner.has_params():
      conditioner_params = _load_params(path, conditioner.abstract_params(),
                                        f"the conditioner in {out_dir}")
  tokenizer = os.path.join(out_dir, "tokenizer")
  return ModelBundle(
      unet=modules["unet"], unet_params=params["unet"], vae=modules["vae"],
      vae_params=params["vae"], text_encoder=modules["text_encoder"],
      text_encoder_params=params["text_encoder"],
      tokenizer_path=tokenizer if os.path.isdir(tokenizer) else None,
      scaling_factor=float(config["scaling_factor"]), diffusion=DiffusionSpec.from_dict(config["diffusion"]),
      image_size=int(config["image_size"]), max_length=int(config["max_length"]),
      metadata={**config.get("metadata", {}), "source": out_dir},
      conditioner=conditioner, conditioner_params=conditioner_params)
