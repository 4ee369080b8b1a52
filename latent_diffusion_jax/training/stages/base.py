"""What a training stage tells the run driver (training/driver.py), in the style of vdm's Experiment.

A stage is a class with a `kind` and four methods; the driver owns everything they share (mesh,
global batch, checkpointer and SIGTERM, resume or sharded creation of the state, compilation, the
loop, metric writer). The driver calls, in this order:

  stage = Stage(config, workdir, mesh, global_batch)
      checks the config, loads frozen parts and the tokenizer, builds the modules, the optimizer
      and the pure step's static task; sets `init_fn` and `trained`.
  stage.data()                -> (resumable iterator of this process's data, global batches)
  stage.start(meta, writer)   -> Plan: the step, its arguments, hooks, checkpoint metadata; called
      once the train state exists (`meta`: the metadata of the checkpoint resumed from, or None).
  stage.finish(result, writer)
      after the loop (also after a preemption: `result["preempted"]`), e.g. a final evaluation;
      may add entries to `result`.
"""

import abc
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

import flax.linen as nn
import ml_collections as mc
from jax.sharding import Mesh


@dataclasses.dataclass
class Plan:
  """How the driver runs a stage once its train state exists.

  Attributes:
    step: the pure `(state, batch, *args) -> (state, metrics)`; the driver compiles it, donated.
    args: its extra non-donated arguments, already placed on the mesh (frozen params, scales).
    hooks: `hook(step, state)` callables run after every step (sample grids, evaluations).
    meta: stage-specific checkpoint metadata, saved beside "kind", "config" and "version".
    hparams: values logged once at the start, beside the global batch.
  """
  step: Callable[..., Tuple[Any, Dict[str, Any]]]
  args: tuple = ()
  hooks: List[Callable[[int, Any], None]] = dataclasses.field(default_factory=list)
  meta: Dict[str, Any] = dataclasses.field(default_factory=dict)
  hparams: Dict[str, Any] = dataclasses.field(default_factory=dict)


class Stage(abc.ABC):
  """One kind of training run (stage 1 autoencoder, stage 2 diffusion, ...).

  Attributes set by the constructor:
    init_fn: `rng -> train state` with boxed params (sharded creation and restore target).
    trained: name -> module of the networks in `state.params` that foreign weights
      (`training.init_checkpoint` naming a diffusers / single-file / native export) may
      initialize; None when the stage starts only from its own workdirs.
  """
  # The checkpoint metadata's "kind": what artifacts/workdir.py loads the run as.
  kind: str = ""

  init_fn: Callable[[Any], Any]
  trained: Optional[Dict[str, nn.Module]] = None

  def __init__(self, config: mc.ConfigDict, workdir: str, mesh: Mesh, global_batch: int):
    self.config, self.workdir, self.mesh, self.global_batch = config, workdir, mesh, global_batch

  @abc.abstractmethod
  def data(self) -> Tuple[Any, Any]:
    """(iterator of this process's batches with get_state / set_state, generator of global batches)."""

  @abc.abstractmethod
  def start(self, meta: Optional[dict], writer) -> Plan:
    """The step, its arguments and hooks, once the train state exists (inside the mesh context)."""

  def finish(self, result: Dict[str, Any], writer) -> None:
    """Runs after the loop, inside the mesh context; the default does nothing."""
    del result, writer
