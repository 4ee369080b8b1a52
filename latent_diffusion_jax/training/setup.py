"""Run set-up shared by the trainers: config checks, mesh, sharded or restored state, compile."""

import json
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from latent_diffusion_jax import parallel
from latent_diffusion_jax.training.checkpointing import (Checkpointer, CheckpointRestoreError,
                                                         resolve_restore_source)


def check_batch(config: mc.ConfigDict, mesh) -> int:
  """The global batch of one step (micro-batch x accumulation), validated against the mesh."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  b = config.training.batch_size
  if b <= 0 or b % shards:
    valid = [shards * k for k in range(1, 5)]
    raise ValueError(f"training.batch_size={b} is not divisible by the data axes data*fsdp = "
                     f"{mesh.shape['data']}*{mesh.shape['fsdp']} = {shards}; valid e.g. {valid}.")
  if b % jax.process_count():
    raise ValueError(f"training.batch_size={b} is not divisible by {jax.process_count()} processes.")
  return b * max(config.optimizer.grad_accum_steps, 1)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_replicated(tree: Any, mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))


def config_to_json(config: mc.ConfigDict) -> str:
  return config.to_json_best_effort(sort_keys=True)


def _tuplify(x):
  if isinstance(x, list):
    return tuple(_tuplify(v) for v in x)
  if isinstance(x, dict):
    return {k: _tuplify(v) for k, v in x.items()}
  return x


def config_from_json(text: str) -> mc.ConfigDict:
  """Rebuilds a run's config over the base config (so every key keeps its declared type)."""
  from latent_diffusion_jax.config import base_config
  config = base_config()
  stored = _tuplify(json.loads(text))

  def merge(dst: mc.ConfigDict, src: dict):
    for k, v in src.items():
      if isinstance(v, dict) and k in dst and isinstance(dst[k], mc.ConfigDict):
        merge(dst[k], v)
      else:
        with dst.ignore_type():
          dst[k] = v

  merge(config, stored)
  return config


def initial_state(config: mc.ConfigDict, workdir: str, init_fn: Callable, mesh, rules,
                  checkpointer: Checkpointer,
                  trained_modules: Optional[Dict[str, Any]] = None) -> Tuple[Any, Any, Any, Any]:
  """Resumes or creates the train state (resume order: workdir > init checkpoint > scratch).

  Args:
    trained_modules: name -> module of the networks in `state.params` that foreign weights
      (training.init_checkpoint naming a diffusers / single-file / native export) may initialize;
      None when this trainer only starts from its own workdirs.

  Returns:
    (state, shardings, data_state or None, meta or None).
  """
  rng = jax.random.key(config.seed)
  abstract, shardings = parallel.sharded_abstract_state(init_fn, rng, mesh=mesh, rules=rules)
  source = resolve_restore_source(workdir, config.training.init_checkpoint or None)
  if source.kind == "workdir":
    state, data, meta = resume(checkpointer, abstract, fallback=config.training.restore_fallback)
    return state, shardings, data, meta
  state, shardings = parallel.create_sharded_state(init_fn, rng, mesh=mesh, rules=rules)
  if source.kind == "init":
    if source.step is None:
      if not trained_modules:
        raise ValueError(f"training.init_checkpoint={config.training.init_checkpoint!r} is not a "
                         "workdir of this package, and this trainer imports no foreign weights.")
      from latent_diffusion_jax.training import foreign_init
      imported = foreign_init.import_params(source.path, trained_modules,
                                            allow_pickle=config.frozen.allow_pickle)
      state = foreign_init.replace_params(state, abstract, shardings, imported, source.path)
      return state, shardings, None, None
    logging.info("Initializing params from %s step %s", source.path, source.step)
    restored, _, _ = Checkpointer(source.path, read_only=True).restore(
        source.step, abstract_state=abstract)
    state = state.replace(params=restored.params, ema_params=restored.ema_params)
  return state, shardings, None, None


def _restore_complete(checkpointer: Checkpointer, step: int, abstract: Any) -> Tuple[Any, Any, Any]:
  state, data, meta = checkpointer.restore(step, abstract_state=abstract)
  # The trainers always save all three items; a step without its data position would silently
  # restart the data order, one without meta would re-derive the latent scale.
  missing = [name for name, value in (("data", data), ("meta", meta)) if value is None]
  if missing:
    raise CheckpointRestoreError(
        f"checkpoint step {step} in {checkpointer.directory} lacks its {' and '.join(missing)} "
        "item(s); it is incomplete. Move it away or set training.restore_fallback=True.")
  return state, data, meta


def _agree(ok: bool) -> bool:
  """Whether every process succeeded, so all of them take the same fallback path."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def resume(checkpointer: Checkpointer, abstract: Any, *, fallback: bool) -> Tuple[Any, Any, Any]:
  """Restores the latest committed step; with `fallback`, damaged steps give way to older ones.

  Once an older step restores, the damaged newer ones are quarantined (renamed, see
  `Checkpointer.quarantine`) so the resumed run can write those step numbers again. When no step
  restores, nothing is renamed.

  Returns:
    (state, data, meta) of the step restored.

  Raises:
    CheckpointRestoreError: when the latest step (or, with `fallback`, every step) fails to restore.
  """
  steps = checkpointer.all_steps()
  damaged = []
  for step in reversed(steps):
    logging.info("Resuming from %s step %d", checkpointer.directory, step)
    error = None
    try:
      restored = _restore_complete(checkpointer, step, abstract)
    except CheckpointRestoreError as e:
      error = e
    if _agree(error is None):
      for bad in damaged:
        logging.warning("Moved damaged checkpoint step %d to %s.", bad, checkpointer.quarantine(bad))
      return restored
    error = error or CheckpointRestoreError(f"checkpoint step {step} failed on another process.")
    if not fallback:
      raise error
    damaged.append(step)
    logging.warning("%s Trying the previous committed step (training.restore_fallback=True).", error)
  raise CheckpointRestoreError(f"no checkpoint in {checkpointer.directory} could be restored "
                               f"(tried steps {steps[::-1]}); see the warnings above.")


def compile_step(step_fn: Callable, state: Any, shardings: Any, batch: Any, extra: tuple,
                 mesh) -> Callable:
  """AOT-compiles the donated step with explicit shardings and logs its memory use."""
  batch_shardings = jax.tree.map(lambda x: x.sharding, batch)
  extra_shardings = jax.tree.map(lambda x: x.sharding, extra)
  jitted = jax.jit(step_fn, in_shardings=(shardings, batch_shardings) + tuple(extra_shardings),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))
  compiled = jitted.lower(state, batch, *extra).compile()
  try:
    mem = compiled.memory_analysis()
    if mem is not None:
      logging.info("Train step memory per device: args %.1f MiB, outputs %.1f MiB, temps %.1f MiB",
                   mem.argument_size_in_bytes / 2**20, mem.output_size_in_bytes / 2**20,
                   mem.temp_size_in_bytes / 2**20)
  except Exception as e:  # memory analysis is optional on some backends
    logging.info("No memory analysis: %s", e)
  return compiled


def device_scalar(x: float, mesh) -> jax.Array:
  return put_replicated(jnp.asarray(x, jnp.float32), mesh)
