"""The frozen parts of stage 2: first-stage autoencoder, text encoder, latent scale factor.

Sources (config.frozen), read by the one loader (artifacts/loader.py):
  vae:           any source with a first stage: a stage-1 workdir of ours (its latest EMA weights
                 and stored scale factor), a diffusers AutoencoderKL / VQModel or pipeline
                 directory, a single file, a native export; or "" for a random VAE (tests).
                 Its kind (KL or VQ) must be `autoencoder.kind`.
  text_encoder:  a transformers CLIPTextModel directory or any source with one; "" for a random
                 one (tests).
The tokenizer (frozen.tokenizer) is data: `data.tokenizers.prepare_run_tokenizer`.
"""

import os
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
from absl import logging

from latent_diffusion_jax.artifacts import loader
from latent_diffusion_jax.core import parallel
from latent_diffusion_jax.models import build
from latent_diffusion_jax.core.errors import UserInputError, MissingInputError


def _overrides(config: mc.ConfigDict) -> dict:
  return dict(dtype=build.dtype_of(config.model.dtype), attention_impl=config.model.attention_impl)


def _source(config: mc.ConfigDict, key: str, valid: str) -> loader.Source:
  path = config.frozen[key]
  if not os.path.exists(path):
    raise MissingInputError(f"frozen.{key}={path!r} does not exist; give {valid}.")
  return loader.Source(path, allow_pickle=config.frozen.allow_pickle)


def load_vae(config: mc.ConfigDict) -> Tuple[Any, Any, Optional[float]]:
  """(module, params, scale factor stored with the source or None) of `frozen.vae`: any weight
  source with a first stage (artifacts.loader), or "" for a random autoencoder of
  `autoencoder.kind` (tests). A loaded first stage must be what the config describes
  (`build.check_first_stage`): the run's config is how its later readers rebuild it."""
  source = config.frozen.vae
  if not source:
    vae = build.build_first_stage(config)
    size = vae.downsample_factor * 2
    params = jax.jit(vae.init)(jax.random.key(config.seed + 1), jnp.zeros((1, size, size, 3)))
    return vae, jax.device_get(parallel.unbox(params["params"])), None
  found = loader.load_networks(
      _source(config, "vae", "a stage-1 workdir, a diffusers AutoencoderKL/VQModel or pipeline "
              "directory, a single file, a native export, or '' for a random VAE"),
      ["vae"], **_overrides(config))
  if "vae" not in found.networks:
    raise UserInputError(f"frozen.vae={source!r} holds no first-stage autoencoder.")
  build.check_first_stage(config, found.networks["vae"].module, source)
  return (*found.networks["vae"], found.scaling_factor)


def load_text_encoder(config: mc.ConfigDict) -> Tuple[Any, Any]:
  """(module, params) of the conditioner; params None when it is trained (initialized with the UNet)."""
  te = config.model.text_encoder
  module = build.build_text_encoder(config.model)
  if module is None or te.trainable:
    return module, None
  if te.kind != "clip":
    raise UserInputError(f"A frozen text encoder must be kind 'clip' (got {te.kind!r}); set "
                     "model.text_encoder.trainable=True to train the LDM transformer.")
  if not config.frozen.text_encoder:
    ids = jnp.zeros((1, te.max_length), jnp.int32)
    params = jax.jit(module.init)(jax.random.key(config.seed + 2), ids)["params"]
    return module, jax.device_get(parallel.unbox(params))
  source = config.frozen.text_encoder
  found = loader.load_networks(
      _source(config, "text_encoder", "a transformers CLIPTextModel directory, a diffusers "
              "pipeline, or '' for a random one"), ["text_encoder"], text_output_layer=te.clip.output_layer,
                               **_overrides(config))
  if "text_encoder" not in found.networks:
    raise UserInputError(f"frozen.text_encoder={source!r} holds no text encoder.")
  return tuple(found.networks["text_encoder"])


def estimate_scale_factor(latent_batches) -> float:
  """The LDM paper's rule: 1 / std of the (unscaled) latents over the first batches."""
  values = np.concatenate([np.asarray(b, np.float64).reshape(-1) for b in latent_batches])
  std = float(values.std())
  if not np.isfinite(std) or std <= 0:
    raise UserInputError(f"Cannot estimate the latent scale factor: latent std is {std}.")
  return 1.0 / std


def log_frozen(vae_params: Any, text_params: Any) -> None:
  count = lambda t: sum(int(np.size(x)) for x in jax.tree.leaves(t)) if t is not None else 0
  logging.info("Frozen: VAE %s params, text encoder %s params", f"{count(vae_params):,}",
               f"{count(text_params):,}")


def build_encoder(config) -> tuple:
  """(BatchEncoder, tokenizer, known scale factor or None) from the config's frozen sources."""
  import tempfile
  from latent_diffusion_jax.data.encoder_job import BatchEncoder
  from latent_diffusion_jax.data.tokenizers import load_tokenizer, prepare_run_tokenizer
  te = config.model.text_encoder
  if te.kind == "none":
    raise UserInputError("Encoding stores caption token ids: use a text-conditioned model config "
                     "(model.text_encoder.kind clip or ldm_transformer).")
  vae, vae_params, stored_scale = load_vae(config)
  text, text_params = None, None
  if config.encode.store_text_embeddings:
    if te.kind != "clip" or te.trainable:
      raise UserInputError("encode.store_text_embeddings needs a frozen CLIP text encoder "
                       "(model.text_encoder.kind='clip', trainable=False).")
    text, text_params = load_text_encoder(config)
  encoder = BatchEncoder(vae, vae_params, text, text_params, batch_size=config.encode.batch_size,
                         storage_dtype=config.encode.storage_dtype)
  # The tokenizer is read into memory; its files are only a staging copy.
  with tempfile.TemporaryDirectory() as staging:
    tokenizer = load_tokenizer(prepare_run_tokenizer(config, staging))
  scale = config.model.latent_scale_factor if config.model.latent_scale_factor > 0 else stored_scale
  return encoder, tokenizer, scale
