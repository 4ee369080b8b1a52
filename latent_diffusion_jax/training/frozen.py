"""The frozen parts of stage 2: first-stage VAE, text encoder, tokenizer, latent scale factor.

Sources (config.frozen):
  vae:           a stage-1 workdir of ours (its latest checkpoint's EMA weights and its stored scale
                 factor), a diffusers AutoencoderKL directory, or "" for a random VAE (tests).
  text_encoder:  a transformers CLIPTextModel directory, or "" for a random one (tests).
  tokenizer:     a CLIP tokenizer directory, or "" to build the embedded dataset's word tokenizer.
"""

import os
import shutil
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
from absl import logging

from latent_diffusion_jax.models import build


def _is_our_workdir(path: str) -> bool:
  from latent_diffusion_jax.training.checkpointing import checkpoint_dir
  return checkpoint_dir(path).is_dir()


def load_vae(config: mc.ConfigDict) -> Tuple[Any, Any, Optional[float]]:
  """(module, params, scale factor stored with the source or None)."""
  source = config.frozen.vae
  if not source:
    vae = build.build_vae(config.model)
    size = vae.downsample_factor * 2
    params = jax.jit(vae.init)(jax.random.key(config.seed + 1), jnp.zeros((1, size, size, 3)))
    return vae, jax.device_get(nn_unbox(params["params"])), None
  if not os.path.exists(source):
    raise FileNotFoundError(f"frozen.vae={source!r} does not exist; give a stage-1 workdir, a diffusers "
                            "AutoencoderKL directory, or '' for a random VAE.")
  if _is_our_workdir(source):
    from latent_diffusion_jax.training.inference_loading import load_autoencoder_from_workdir
    return load_autoencoder_from_workdir(source, overrides=_overrides(config))
  from latent_diffusion_jax.interop.diffusers import load_vae as load_diffusers_vae
  vae, params, cfg = load_diffusers_vae(source, allow_pickle=config.frozen.allow_pickle,
                                        **_overrides(config))
  return vae, params, float(cfg["scaling_factor"]) if "scaling_factor" in cfg else None


def load_text_encoder(config: mc.ConfigDict) -> Tuple[Any, Any]:
  """(module, params) of the conditioner; params None when it is trained (initialized with the UNet)."""
  te = config.model.text_encoder
  module = build.build_text_encoder(config.model)
  if module is None or te.trainable:
    return module, None
  if te.kind != "clip":
    raise ValueError(f"A frozen text encoder must be kind 'clip' (got {te.kind!r}); set "
                     "model.text_encoder.trainable=True to train the LDM transformer.")
  if not config.frozen.text_encoder:
    ids = jnp.zeros((1, te.max_length), jnp.int32)
    params = jax.jit(module.init)(jax.random.key(config.seed + 2), ids)["params"]
    return module, jax.device_get(nn_unbox(params))
  from latent_diffusion_jax.interop.clip import load_clip_text_model
  module, params = load_clip_text_model(
      config.frozen.text_encoder, dtype=build.dtype_of(config.model.dtype),
      output_layer=te.clip.output_layer, attention_impl=config.model.attention_impl,
      allow_pickle=config.frozen.allow_pickle)
  return module, params


def prepare_tokenizer(config: mc.ConfigDict, workdir: str) -> str:
  """Copies or builds the tokenizer into `<workdir>/tokenizer` so the run is self-contained."""
  from latent_diffusion_jax.data import tokenizers
  dest = os.path.join(workdir, "tokenizer")
  if os.path.isdir(dest):
    return dest
  source = config.frozen.tokenizer
  # Written under a private name and renamed: a run killed half-way, or several processes sharing
  # the workdir, never leave a partial tokenizer under the name later runs trust.
  tmp = f"{dest}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  if source:
    if not os.path.isdir(source):
      raise FileNotFoundError(f"frozen.tokenizer={source!r} is not a directory with a CLIP tokenizer.")
    tokenizers.load_tokenizer(source)  # fails early, naming the path, if it is not a tokenizer
    shutil.copytree(source, tmp)
  else:
    from latent_diffusion_jax.data import shapes
    tokenizers.build_word_tokenizer(shapes.vocabulary(), tmp,
                                    model_max_length=config.model.text_encoder.max_length)
  try:
    os.rename(tmp, dest)
  except OSError:  # another process renamed its identical copy first
    if not os.path.isdir(dest):
      raise
    shutil.rmtree(tmp, ignore_errors=True)
  return dest


def estimate_scale_factor(latent_batches) -> float:
  """The LDM paper's rule: 1 / std of the (unscaled) latents over the first batches."""
  values = np.concatenate([np.asarray(b, np.float64).reshape(-1) for b in latent_batches])
  std = float(values.std())
  if not np.isfinite(std) or std <= 0:
    raise ValueError(f"Cannot estimate the latent scale factor: latent std is {std}.")
  return 1.0 / std


def _overrides(config: mc.ConfigDict) -> dict:
  return dict(dtype=build.dtype_of(config.model.dtype), attention_impl=config.model.attention_impl)


def nn_unbox(tree: Any) -> Any:
  import flax.linen as nn
  return nn.meta.unbox(tree)


def log_frozen(vae_params: Any, text_params: Any) -> None:
  count = lambda t: sum(int(np.size(x)) for x in jax.tree.leaves(t)) if t is not None else 0
  logging.info("Frozen: VAE %s params, text encoder %s params", f"{count(vae_params):,}",
               f"{count(text_params):,}")
