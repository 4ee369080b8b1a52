"""The one run driver: every stage (training/stages/, chosen by `config.stage`) runs through `train`.

  python train.py --config configs/shapes_ldm.py --workdir /tmp/ldm

`train(config, workdir)` in order: the mesh and global batch; the stage (its checks, frozen parts,
tokenizer, modules, optimizer); the checkpointer and its SIGTERM handler; the stage's data; the
train state, resumed (workdir > init checkpoint > scratch, training/startup.py) or created sharded;
the stage's step, arguments and hooks; the step compiled ahead on the first batch; the loop
(training/loop.py); the stage's finish (stage 1: final evaluation and stage1.json). Every checkpoint's
metadata holds the stage's `kind`, the config, the package version and what the stage adds (stage
2: latent_scale_factor).
"""

import itertools
import os
from typing import Any, Dict

import jax
import ml_collections as mc
from absl import logging

from latent_diffusion_jax import __version__
from latent_diffusion_jax.checkpoints.checkpointer import Checkpointer
from latent_diffusion_jax.core import config as config_lib
from latent_diffusion_jax.core import parallel
from latent_diffusion_jax.training import loop, stages, startup


def train(config: mc.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains the stage `config.stage` names in `workdir` (resuming if it holds a checkpoint).

  Returns:
    The loop summary {"state", "step", "preempted", "last_metrics"}, "step_compilations" (train
    step executables compiled: one per batch shape) plus what the stage's finish adds (stage 1:
    "eval"; stage 2: "latent_scale_factor").
  """
  os.makedirs(workdir, exist_ok=True)
  stage_class = stages.get(config.get("stage", "diffusion"))
  mesh = parallel.create_mesh(config.mesh.shape)
  rules = tuple(tuple(r) for r in config.mesh.logical_axis_rules)
  global_batch = startup.check_batch(config, mesh)
  logging.info("Mesh %s on %d devices, global batch %d", dict(mesh.shape), jax.device_count(),
               global_batch)
  stage = stage_class(config, workdir, mesh, global_batch)
  checkpointer = Checkpointer(workdir, save_interval_steps=config.training.checkpoint_every,
                              max_to_keep=config.training.keep_checkpoints,
                              async_save=config.training.async_checkpointing)
  checkpointer.install_sigterm_handler()
  data_iter, batches = stage.data()
  writer = loop.create_writer(workdir)
  with parallel.mesh_context(mesh, rules):
    state, shardings, data_state, meta = startup.initial_state(
        config, workdir, stage.init_fn, mesh, rules, checkpointer, stage.trained)
    if data_state is not None:
      data_iter.set_state(data_state)
    plan = stage.start(meta, writer)
    first = next(batches)
    step_fn = startup.compile_step(plan.step, state, shardings, first, plan.args, mesh)
    meta_value = {"kind": stage.kind, "config": config_lib.config_to_json(config), **plan.meta,
                  "version": __version__}
    writer.write_hparams({"global_batch": global_batch, **plan.hparams})
    result = loop.run(
        cfg=loop.LoopConfig.from_config(config, global_batch),
        state=state, step_fn=step_fn, step_args=plan.args, batches=itertools.chain([first], batches),
        checkpointer=checkpointer, data_state=data_iter.get_state, meta=lambda: meta_value,
        writer=writer, hooks=plan.hooks)
  checkpointer.close()
  # One per batch shape (aspect-ratio buckets), each reused for every later batch of its shape.
  result["step_compilations"] = step_fn.num_compilations
  with parallel.mesh_context(mesh, rules):
    stage.finish(result, writer)
  return result
