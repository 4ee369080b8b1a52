"""pytorch-fid's Inception weights in our layout: conversion, the safetensors file, loading.

The FID weights are published once, as a PyTorch pickle (pytorch-fid's release asset
`pt_inception-2015-12-05-6726825d.pth`, TensorFlow's 2015-12-05 graph ported to PyTorch). They are
converted once, with torch, into a safetensors file that then loads without torch:

  python -m latent_diffusion_jax.cli.convert_inception \
      --pth pt_inception-2015-12-05-6726825d.pth --out weights/inception_fid.safetensors

File format: safetensors, float32, flat keys "<collection>/<module path>/<leaf>" of the Flax
variables of `inception.InceptionV3FID`, e.g. "params/Mixed_5b/branch5x5_2/conv/kernel" (HWIO),
"params/Mixed_5b/branch5x5_2/bn/scale", "batch_stats/Mixed_5b/branch5x5_2/bn/mean",
"params/fc/kernel" ([2048, 1008]); metadata {"format": FORMAT}.
"""

import os
from typing import Any, Dict, Mapping, Optional

import numpy as np
from flax import traverse_util

from latent_diffusion_jax.core.errors import InputFileError, MissingInputError
from latent_diffusion_jax.evaluation.feature_nets import inception
from latent_diffusion_jax.evaluation.feature_nets.base import FeatureNet

FORMAT = "latent_diffusion_jax.inception_fid"
PTH_NAME = "pt_inception-2015-12-05-6726825d.pth"
DEFAULT_WEIGHTS = os.path.join("weights", "inception_fid.safetensors")
PTH_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PTH_NAME)


def convert_command(out: str = DEFAULT_WEIGHTS, pth: str = PTH_NAME) -> str:
  return f"python -m latent_diffusion_jax.cli.convert_inception --pth {pth} --out {out}"


def _torch_key_in_variables(key: str) -> Optional[str]:
  """pytorch-fid key -> dotted path in {"params", "batch_stats"}; None drops the key."""
  if key.endswith(".num_batches_tracked"):  # a BatchNorm training counter
    return None
  for torch_leaf, ours in ((".running_mean", ".mean"), (".running_var", ".var")):
    if key.endswith(torch_leaf):
      return "batch_stats." + key[:-len(torch_leaf)] + ours
  return "params." + key


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  """pytorch-fid's `fid_inception_v3().state_dict()` (numpy values) -> our Flax variables.

  Returns:
    {"params": ..., "batch_stats": ...} of float32 numpy arrays for `inception.InceptionV3FID`.

  Raises:
    WeightImportError (an InputFileError): listing missing, unexpected and misshapen keys together
      (for example a torchvision Inception-v3 file: 1000 classes, AuxLogits).
  """
  # Local import: interop sits below evaluation, and its converter is only needed here.
  from latent_diffusion_jax.interop.convert import torch_to_flax
  state_dict = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
  return torch_to_flax(state_dict, inception.abstract_variables(),
                       what="pytorch-fid's Inception-v3 (FID)", rename=_torch_key_in_variables)


def save(variables: Any, path: str) -> str:
  """Writes the variables as one safetensors file (format in the module docstring)."""
  from safetensors.numpy import save_file
  flat = traverse_util.flatten_dict(variables)
  tensors = {"/".join(k): np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flat.items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file(tensors, path, metadata={"format": FORMAT})
  return path


def load_variables(path: str = DEFAULT_WEIGHTS) -> Dict[str, Any]:
  """Reads a file written by `save`; checks every key and shape against the network.

  Raises:
    MissingInputError: no file at `path` (the message has the command that writes it).
    InputFileError: a PyTorch file given directly, or a file that is not our Inception.
  """
  if path.endswith((".pth", ".pt", ".bin", ".ckpt")):
    raise InputFileError(
        f"{path} is a PyTorch file; convert it once into the safetensors file the metrics load:\n"
        f"  {convert_command(pth=path)}")
  if not os.path.isfile(path):
    raise MissingInputError(
        f"No FID Inception weights at {path}. Download pytorch-fid's {PTH_NAME} ({PTH_URL}) and "
        f"convert it (needs torch, once):\n  {convert_command(out=path)}")
  from safetensors import SafetensorError, safe_open
  try:
    with safe_open(path, framework="numpy") as f:
      fmt = (f.metadata() or {}).get("format")
      flat = {tuple(k.split("/")): f.get_tensor(k) for k in f.keys()}
  except (SafetensorError, OSError) as error:
    raise InputFileError(f"{path} is not a readable safetensors file: {error}") from error
  if fmt != FORMAT:
    raise InputFileError(f"{path} is not an FID Inception file written by convert_inception "
                         f"(format {fmt!r}, expected {FORMAT!r}); rewrite it with:\n"
                         f"  {convert_command(out=path)}")
  expected = traverse_util.flatten_dict(inception.abstract_variables())
  missing = sorted("/".join(k) for k in expected.keys() - flat.keys())
  unexpected = sorted("/".join(k) for k in flat.keys() - expected.keys())
  misshapen = sorted(f"{'/'.join(k)}: file {flat[k].shape} vs network {expected[k].shape}"
                     for k in expected.keys() & flat.keys() if flat[k].shape != expected[k].shape)
  if missing or unexpected or misshapen:
    problems = [f"{title} ({len(items)}): {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
                for title, items in (("missing", missing), ("unexpected", unexpected),
                                     ("shape mismatches", misshapen)) if items]
    raise InputFileError(f"{path} does not fit the FID Inception-v3: " + "; ".join(problems))
  return traverse_util.unflatten_dict(flat)


def feature_net(variables: Any) -> FeatureNet:
  """The FID Inception as a FeatureNet: "features" pool3 [N, 2048], "logits" [N, 1008]."""
  return FeatureNet(name="inception", dim=inception.FEATURE_DIM, apply_fn=inception.apply,
                    params=variables)


def load(weights_path: str = DEFAULT_WEIGHTS) -> FeatureNet:
  """The FID Inception with the weights of a converted file (see the module docstring)."""
  return feature_net(load_variables(weights_path))
