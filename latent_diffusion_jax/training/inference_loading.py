"""Turns a training workdir of ours into modules and params for sampling, export or stage 2."""

import json
import os
from typing import Any, Optional, Tuple

import jax
import ml_collections as mc

from latent_diffusion_jax import parallel
from latent_diffusion_jax.models import build
from latent_diffusion_jax.models.bundle import ModelBundle
from latent_diffusion_jax.training import setup
from latent_diffusion_jax.training.checkpointing import Checkpointer
from latent_diffusion_jax.training.state import make_optimizer
from latent_diffusion_jax.training.weights_io import load_frozen


def read_run(workdir: str, step: Optional[int] = None) -> Tuple[Checkpointer, int, mc.ConfigDict, dict]:
  """(checkpointer, step, config, meta) of a committed checkpoint (default: the latest)."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"No workdir at {workdir!r}.")
  ckpt = Checkpointer(workdir, read_only=True)
  step, meta = ckpt.read_meta(step)
  if not meta or "config" not in meta:
    raise ValueError(f"Checkpoint step {step} in {workdir} has no config in its metadata.")
  return ckpt, step, setup.config_from_json(meta["config"]), meta


def _restore_trained(ckpt: Checkpointer, step: int, init_fn, config, use_ema: bool) -> Any:
  """The trained param tree of a step (EMA when asked and present), on the first local device."""
  mesh = parallel.create_mesh((1, 1, 1), devices=jax.local_devices()[:1])
  rules = tuple(tuple(r) for r in config.mesh.logical_axis_rules)
  abstract, _ = parallel.sharded_abstract_state(init_fn, jax.random.key(0), mesh=mesh, rules=rules)
  state, _, _ = ckpt.restore(step, abstract_state=abstract)
  params = state.ema_params if use_ema and state.ema_params is not None else state.params
  return jax.device_get(params)


def _overridden(config: mc.ConfigDict, overrides: Optional[dict]) -> mc.ConfigDict:
  if overrides:
    for k, v in overrides.items():
      if k == "dtype":
        config.model.dtype = {v2: k2 for k2, v2 in build._DTYPES.items()}.get(v, v)
      elif k == "attention_impl":
        config.model.attention_impl = v
  return config


def load_autoencoder_from_workdir(workdir: str, step: Optional[int] = None, use_ema: bool = True,
                                  overrides: Optional[dict] = None) -> Tuple[Any, Any, Optional[float]]:
  """(vae module, params, stored latent scale factor or None) of a stage-1 run."""
  from latent_diffusion_jax.training.autoencoder_trainer import (STAGE1_SUMMARY, build_first_stage,
                                                                 build_init_fn)
  ckpt, step, config, meta = read_run(workdir, step)
  if meta.get("kind") != "autoencoder":
    raise ValueError(f"{workdir} is a {meta.get('kind')!r} run, not a stage-1 autoencoder run.")
  config = _overridden(config, overrides)
  vae = build_first_stage(config)
  params = _restore_trained(ckpt, step, build_init_fn(config, vae), config, use_ema)["vae"]
  scale = None
  summary_path = os.path.join(workdir, STAGE1_SUMMARY)
  if os.path.isfile(summary_path):
    with open(summary_path) as f:
      scale = float(json.load(f)["latent_scale_factor"])
  return vae, params, scale


def load_bundle_from_workdir(workdir: str, step: Optional[int] = None,
                             use_ema: bool = True) -> ModelBundle:
  """Everything sampling and export need from a stage-2 run's checkpoint and frozen weights."""
  from latent_diffusion_jax.training.diffusion_trainer import build_init_fn
  ckpt, step, config, meta = read_run(workdir, step)
  if meta.get("kind") != "latent_diffusion":
    raise ValueError(f"{workdir} is a {meta.get('kind')!r} run, not a latent diffusion run.")
  unet, vae = build.build_unet(config.model), build.build_vae(config.model)
  text_encoder = build.build_text_encoder(config.model)
  tx = make_optimizer(config.optimizer, config.training.num_steps)
  trained = _restore_trained(ckpt, step, build_init_fn(config, unet, text_encoder, tx), config, use_ema)
  vae_params = load_frozen(workdir, "vae")
  if vae_params is None:
    raise FileNotFoundError(f"{workdir}/frozen/vae.safetensors is missing; the run cannot be sampled.")
  te = config.model.text_encoder
  text_params = trained.get("text_encoder") if te.trainable else load_frozen(workdir, "text_encoder")
  tokenizer = os.path.join(workdir, "tokenizer")
  return ModelBundle(
      unet=unet, unet_params=trained["unet"], vae=vae, vae_params=vae_params,
      text_encoder=text_encoder, text_encoder_params=text_params,
      tokenizer_path=tokenizer if os.path.isdir(tokenizer) else None,
      scaling_factor=float(meta["latent_scale_factor"]),
      diffusion={k: config.diffusion[k] for k in ("schedule", "num_timesteps", "beta_start", "beta_end",
                                                  "rescale_zero_terminal_snr", "prediction_type")},
      image_size=config.model.image_size, max_length=te.max_length,
      metadata={"source": workdir, "step": step, "ema": bool(use_ema), "config": meta["config"],
                "version": meta.get("version", "")})
