"""Run set-up the driver (training/driver.py) uses: config checks, sharded or restored state, compile."""

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections as mc
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from latent_diffusion_jax.core import flops as flops_lib
from latent_diffusion_jax.core import parallel
from latent_diffusion_jax.checkpoints.checkpointer import Checkpointer, resolve_restore_source
from latent_diffusion_jax.checkpoints.resume import resume
from latent_diffusion_jax.core.errors import UserInputError


def check_batch(config: mc.ConfigDict, mesh) -> int:
  """The global batch of one step (micro-batch x accumulation), validated against the mesh."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  b = config.training.batch_size
  if b <= 0 or b % shards:
    valid = [shards * k for k in range(1, 5)]
    raise UserInputError(f"training.batch_size={b} is not divisible by the data axes data*fsdp = "
                     f"{mesh.shape['data']}*{mesh.shape['fsdp']} = {shards}; valid e.g. {valid}.")
  if b % jax.process_count():
    raise UserInputError(f"training.batch_size={b} is not divisible by {jax.process_count()} processes.")
  return b * max(config.optimizer.grad_accum_steps, 1)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_replicated(tree: Any, mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))


def initial_state(config: mc.ConfigDict, workdir: str, init_fn: Callable, mesh, rules,
                  checkpointer: Checkpointer,
                  trained_modules: Optional[Dict[str, Any]] = None) -> Tuple[Any, Any, Any, Any]:
  """Resumes or creates the train state (resume order: workdir > init checkpoint > scratch).

  Args:
    trained_modules: name -> module of the networks in `state.params` that foreign weights
      (training.init_checkpoint naming a diffusers / single-file / native export) may initialize;
      None when the stage only starts from its own workdirs.

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
        raise UserInputError(f"training.init_checkpoint={config.training.init_checkpoint!r} is not a "
                         "workdir of this package, and this stage imports no foreign weights.")
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


class CompiledStep:
  """The donated step, compiled ahead once per batch shape and reused.

  Aspect-ratio buckets (data.buckets) feed batches of several shapes; each shape is compiled the
  first time it arrives (logging its memory use) and its executable reused for every later batch
  of that shape. The shardings do not depend on the shape (the state's are fixed; a batch array
  is split over the data axes whatever its spatial size), so one jitted function serves all.

  Attributes:
    executables: batch shape signature -> compiled executable; its length is the number of
      compilations.
    flops: batch shape signature -> FLOPs per device of one call by XLA's cost analysis (None
      where the backend reports none).
    last_flops: `flops` of the batch shape of the latest call (what the loop's MFU adds up).
  """

  def __init__(self, jitted):
    self._jitted = jitted
    self.executables: Dict[Any, Any] = {}
    self.flops: Dict[Any, Optional[float]] = {}
    self.last_flops: Optional[float] = None

  @staticmethod
  def signature(batch: Any) -> Any:
    leaves, treedef = jax.tree.flatten(batch)
    return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)

  def compile_for(self, state: Any, batch: Any, extra: tuple):
    key = self.signature(batch)
    if key not in self.executables:
      compiled = self._jitted.lower(state, batch, *extra).compile()
      shapes = sorted({s for s, _ in key[1]})
      logging.info("Train step compiled for batch shapes %s (%d shape(s) so far)", shapes,
                   len(self.executables) + 1)
      _log_memory(compiled)
      self.executables[key] = compiled
      self.flops[key] = flops_lib.step_flops(compiled)
    self.last_flops = self.flops[key]
    return self.executables[key]

  def __call__(self, state: Any, batch: Any, *extra):
    return self.compile_for(state, batch, extra)(state, batch, *extra)

  @property
  def num_compilations(self) -> int:
    return len(self.executables)


def _log_memory(compiled) -> None:
  try:
    mem = compiled.memory_analysis()
    if mem is not None:
      logging.info("Train step memory per device: args %.1f MiB, outputs %.1f MiB, temps %.1f MiB",
                   mem.argument_size_in_bytes / 2**20, mem.output_size_in_bytes / 2**20,
                   mem.temp_size_in_bytes / 2**20)
  except Exception as e:  # memory analysis is optional on some backends
    logging.info("No memory analysis: %s", e)


def compile_step(step_fn: Callable, state: Any, shardings: Any, batch: Any, extra: tuple,
                 mesh) -> CompiledStep:
  """AOT-compiles the donated step with explicit shardings for `batch`'s shape (logging its memory
  use); batches of other shapes (aspect-ratio buckets) compile once each on arrival."""
  batch_shardings = jax.tree.map(lambda x: x.sharding, batch)
  extra_shardings = jax.tree.map(lambda x: x.sharding, extra)
  jitted = jax.jit(step_fn, in_shardings=(shardings, batch_shardings) + tuple(extra_shardings),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))
  step = CompiledStep(jitted)
  step.compile_for(state, batch, extra)
  return step


def device_scalar(x: float, mesh) -> jax.Array:
  return put_replicated(jnp.asarray(x, jnp.float32), mesh)
