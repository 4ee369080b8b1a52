"""Our training workdirs as weight sources: the trained networks of a step, and nothing more.

Only the arrays asked for are read (Orbax partial restore of `ema_params/<net>` or
`params/<net>`); the optimizer state, which holds about twice the weights again, stays on disk.
A stage-2 workdir also keeps its frozen networks (`frozen/*.safetensors`) and its tokenizer, so
it loads without the sources it was trained from.
"""

import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import ml_collections as mc

from latent_diffusion_jax.checkpoints.checkpointer import Checkpointer
from latent_diffusion_jax.checkpoints.trees import load_frozen
from latent_diffusion_jax.core import parallel
from latent_diffusion_jax.core.config import config_from_json
from latent_diffusion_jax.diffusion.spec import DiffusionSpec
from latent_diffusion_jax.models import build
from latent_diffusion_jax.models.bundle import ModelBundle
from latent_diffusion_jax.core.errors import UserInputError, MissingInputError

# The `kind` a trainer writes into each checkpoint's metadata.
AUTOENCODER_KIND = "autoencoder"
DIFFUSION_KIND = "latent_diffusion"
# Written by the stage-1 trainer beside its checkpoints: held-out metrics and the latent scale.
STAGE1_SUMMARY = "stage1.json"


def read_run(workdir: str, step: Optional[int] = None) -> Tuple[Checkpointer, int, mc.ConfigDict, dict]:
  """(checkpointer, step, config, meta) of a committed checkpoint (default: the latest)."""
  if not os.path.isdir(workdir):
    raise MissingInputError(f"No workdir at {workdir!r}.")
  ckpt = Checkpointer(workdir, read_only=True)
  step, meta = ckpt.read_meta(step)
  if not meta or "config" not in meta:
    raise UserInputError(f"Checkpoint step {step} in {workdir} has no config in its metadata.")
  return ckpt, step, config_from_json(meta["config"]), meta


def run_kind(workdir: str) -> str:
  """The `kind` of the run's latest checkpoint (AUTOENCODER_KIND or DIFFUSION_KIND)."""
  return read_run(workdir)[3].get("kind", "")


def restore_networks(ckpt: Checkpointer, step: int, config: mc.ConfigDict,
                     modules: Dict[str, nn.Module], use_ema: bool,
                     max_length: int = 1) -> Dict[str, Any]:
  """Host param trees of `modules` (name in the train state -> module) at `step`.

  EMA params when `use_ema` and the run kept them (optimizer.ema_decay > 0), raw ones otherwise.
  """
  tree = "ema_params" if use_ema and config.optimizer.ema_decay > 0 else "params"
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {tree: {
      name: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                         parallel.unbox(build.abstract_module_params(module, max_length)))
      for name, module in modules.items()}}
  return jax.device_get(ckpt.restore_subtree(step, target)[tree])


def _overridden(config: mc.ConfigDict, dtype: Optional[Any], attention_impl: Optional[str]
                ) -> mc.ConfigDict:
  """The run's config with runtime fields replaced (compute dtype, attention kernel)."""
  if dtype is not None:
    names = {v: k for k, v in build._DTYPES.items()}
    config.model.dtype = names.get(dtype, dtype)
  if attention_impl is not None:
    config.model.attention_impl = attention_impl
  return config


def _check_kind(meta: dict, workdir: str, kind: str) -> None:
  if meta.get("kind") != kind:
    raise UserInputError(f"{workdir} is a {meta.get('kind')!r} run, not a {kind!r} run.")


def load_first_stage(workdir: str, step: Optional[int] = None, use_ema: bool = True, *,
                     dtype: Optional[Any] = None, attention_impl: Optional[str] = None
                     ) -> Tuple[nn.Module, Any, Optional[float]]:
  """(autoencoder module, params, stored latent scale factor or None) of a stage-1 run."""
  ckpt, step, config, meta = read_run(workdir, step)
  _check_kind(meta, workdir, AUTOENCODER_KIND)
  vae = build.build_first_stage(_overridden(config, dtype, attention_impl))
  params = restore_networks(ckpt, step, config, {"vae": vae}, use_ema)["vae"]
  scale = None
  summary_path = os.path.join(workdir, STAGE1_SUMMARY)
  if os.path.isfile(summary_path):
    with open(summary_path) as f:
      scale = float(json.load(f)["latent_scale_factor"])
  return vae, params, scale


def load_bundle(workdir: str, step: Optional[int] = None, use_ema: bool = True, *,
                dtype: Optional[Any] = None, attention_impl: Optional[str] = None,
                networks: Sequence[str] = ("unet", "vae", "text_encoder")) -> ModelBundle:
  """Everything sampling and export need from a stage-2 run: the trained networks of a step and
  the frozen ones the run stored. `networks` limits what is read (the others stay None).

  The first stage is rebuilt from the run's config: `autoencoder.kind` ("kl", or "vq" with the
  codebook keys) and `model.vae`, which the trainer checked against the frozen network."""
  ckpt, step, config, meta = read_run(workdir, step)
  _check_kind(meta, workdir, DIFFUSION_KIND)
  config = _overridden(config, dtype, attention_impl)
  te = config.model.text_encoder
  unet, vae = build.build_unet(config.model), build.build_first_stage(config)
  text_encoder = build.build_text_encoder(config.model)
  conditioner = None if text_encoder is not None else build.build_conditioner(config.model)
  trained = {"unet": unet} if "unet" in networks else {}
  if te.trainable and text_encoder is not None and "text_encoder" in networks:
    trained["text_encoder"] = text_encoder
  with_conditioner = (conditioner is not None and conditioner.trainable
                      and conditioner.has_params() and "unet" in networks)
  if with_conditioner:
    trained[conditioner.param_key] = conditioner
  params = restore_networks(ckpt, step, config, trained, use_ema, te.max_length) if trained else {}
  vae_params = load_frozen(workdir, "vae") if "vae" in networks else None
  if "vae" in networks and vae_params is None:
    raise MissingInputError(f"{workdir}/frozen/vae.safetensors is missing; the run cannot be sampled.")
  if vae_params is not None and ("quantize" in vae_params) != (build.first_stage_kind(vae) == "vq"):
    raise UserInputError(
        f"{workdir}/frozen/vae.safetensors holds a {'VQ' if 'quantize' in vae_params else 'KL'} "
        f"first stage, but the run's config says autoencoder.kind={config.autoencoder.kind!r}.")
  text_params = None
  if text_encoder is not None and "text_encoder" in networks:
    text_params = params.get("text_encoder") if te.trainable else load_frozen(workdir, "text_encoder")
  tokenizer = os.path.join(workdir, "tokenizer")
  return ModelBundle(
      unet=unet, unet_params=params.get("unet"), vae=vae, vae_params=vae_params,
      text_encoder=text_encoder, text_encoder_params=text_params,
      tokenizer_path=tokenizer if os.path.isdir(tokenizer) else None,
      scaling_factor=float(meta["latent_scale_factor"]),
      diffusion=DiffusionSpec.from_config(config.diffusion),
      image_size=config.model.image_size, max_length=te.max_length,
      metadata={"source": workdir, "step": step, "ema": bool(use_ema), "config": meta["config"],
                "version": meta.get("version", "")},
      conditioner=conditioner,
      conditioner_params=params.get(conditioner.param_key) if with_conditioner else None)
