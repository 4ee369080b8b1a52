"""The host-side training loop of every stage (run by training/driver.py): steps, metrics,
checkpoints, preemption.

The device never waits for the host: a step's metrics are fetched after the next step has been
dispatched (one step late), except at checkpoint steps, where they are checked before saving so a
non-finite step is never written.

Every log line carries img/s and, where the step is a `startup.CompiledStep` whose backend reports
a cost analysis, the compute rate: `tflop_per_sec_per_device` (XLA's FLOPs per device of the
compiled step, times the steps run, over the wall time) and `mfu`, that rate over the device's
matmul peak (`training.peak_flops_per_device`, or measured once at start-up in the model's compute
dtype: core/flops.cached_matmul_peak). XLA counts a loop body once: a step with gradient
accumulation is counted as its micro-batch step times the accumulation steps; loops inside the
model (chunked attention) are under-counted.
"""

import dataclasses
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from latent_diffusion_jax.core import flops as flops_lib
from latent_diffusion_jax.core.errors import RunHalted


class NonFiniteLossError(RunHalted):
  """Training stopped on a non-finite loss or gradient (nonfinite_policy="halt")."""


@dataclasses.dataclass
class LoopConfig:
  num_steps: int
  log_every: int
  checkpoint_every: int
  global_batch: int
  nonfinite_policy: str = "halt"
  # FLOP/s one device can do (the MFU denominator); <= 0: measured at start-up.
  peak_flops_per_device: float = 0.0
  # The dtype the peak is measured in (the networks' compute dtype).
  compute_dtype: str = "float32"
  # Micro-batches per step: XLA counts their scan body once, so its FLOPs are multiplied by this.
  grad_accum_steps: int = 1

  @classmethod
  def from_config(cls, config, global_batch: int) -> "LoopConfig":
    """The loop settings of `config.training` for a run with this global batch."""
    t = config.training
    return cls(num_steps=t.num_steps, log_every=t.log_every, checkpoint_every=t.checkpoint_every,
               global_batch=global_batch, nonfinite_policy=t.nonfinite_policy,
               peak_flops_per_device=float(t.get("peak_flops_per_device", 0.0)),
               compute_dtype=config.model.dtype,
               grad_accum_steps=max(int(config.optimizer.grad_accum_steps), 1))


class _MetricsAccumulator:
  """Averages scalar metrics and sums per-timestep-bucket losses between log lines."""

  def __init__(self):
    self.reset()

  def reset(self):
    self.sums: Dict[str, float] = {}
    self.count = 0
    self.bucket_sums = None
    self.bucket_counts = None
    self.flops = 0.0  # per device; None once a step without a count was added
    self.t0 = time.perf_counter()

  def add(self, metrics: Dict[str, np.ndarray], flops: Optional[float] = None):
    self.count += 1
    self.flops = None if flops is None or self.flops is None else self.flops + flops
    for k, v in metrics.items():
      if k in ("bucket_loss_sums", "bucket_counts"):
        continue
      if np.ndim(v) == 0:
        self.sums[k] = self.sums.get(k, 0.0) + float(v)
    if "bucket_loss_sums" in metrics:
      s, c = np.asarray(metrics["bucket_loss_sums"]), np.asarray(metrics["bucket_counts"])
      self.bucket_sums = s if self.bucket_sums is None else self.bucket_sums + s
      self.bucket_counts = c if self.bucket_counts is None else self.bucket_counts + c

  def summary(self, global_batch: int, peak_flops: Optional[float] = None) -> Dict[str, float]:
    out = {k: v / max(self.count, 1) for k, v in self.sums.items()}
    out.pop("finite", None)
    elapsed = time.perf_counter() - self.t0
    out["steps_per_sec"] = self.count / elapsed
    out["images_per_sec"] = self.count * global_batch / elapsed
    if self.flops and self.count:
      rate = self.flops / elapsed
      out["tflop_per_sec_per_device"] = rate / 1e12
      if peak_flops:
        out["mfu"] = rate / peak_flops
    if self.bucket_sums is not None:
      for i, (s, c) in enumerate(zip(self.bucket_sums, self.bucket_counts)):
        if c > 0:
          out[f"loss_by_timestep/bucket_{i:02d}"] = float(s / c)
    return out


def _peak_flops(cfg: LoopConfig, step_fn: Callable) -> Optional[float]:
  """The MFU denominator: the configured peak, else the measured one; None where the step has no
  FLOP count to divide (not a CompiledStep, or no cost analysis on this backend)."""
  if getattr(step_fn, "last_flops", None) is None:
    logging.info("No FLOP count for this step: MFU and TFLOP/s are not logged.")
    return None
  if cfg.peak_flops_per_device > 0:
    return cfg.peak_flops_per_device
  try:
    peak = flops_lib.cached_matmul_peak(jnp.dtype(cfg.compute_dtype))
  except Exception as e:  # a peak is a diagnostic: never stop training for it
    logging.warning("Could not measure the matmul peak (%s): MFU is not logged.", e)
    return None
  logging.info("Matmul peak per device (%s, %s), measured: %.3f TFLOP/s; MFU is against it "
               "(set training.peak_flops_per_device to use a datasheet value).",
               jax.devices()[0].device_kind, cfg.compute_dtype, peak / 1e12)
  return peak


def _flops_of_call(cfg: LoopConfig, step_fn: Callable) -> Optional[float]:
  flops = getattr(step_fn, "last_flops", None)
  return None if flops is None else flops * cfg.grad_accum_steps


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard + console on process 0, console only on the others."""
  return metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)


def run(*, cfg: LoopConfig, state: Any, step_fn: Callable, step_args: tuple,
        batches: Iterator[Any], checkpointer, data_state: Callable[[], dict],
        meta: Callable[[], dict], writer: metric_writers.MetricWriter,
        hooks: Optional[List[Callable[[int, Any], None]]] = None) -> Dict[str, Any]:
  """Runs steps from `state.step` to `cfg.num_steps`.

  Args:
    cfg: loop settings.
    state: the (sharded) train state; its `step` says where to start.
    step_fn: compiled `(state, batch, *step_args) -> (state, metrics)`.
    step_args: extra (non-donated) step arguments, e.g. frozen params.
    batches: yields global batches ready for `step_fn`.
    checkpointer: a `training.checkpointing.Checkpointer`.
    data_state: returns the JSON input position after the batches consumed so far.
    meta: returns the JSON metadata saved with each checkpoint.
    writer: clu metric writer.
    hooks: called as hook(step, state) after each step (e.g. periodic sample grids).

  Returns:
    {"state", "step", "preempted", "last_metrics"}.
  """
  step = int(jax.device_get(state.step))
  report = periodic_actions.ReportProgress(num_train_steps=cfg.num_steps, writer=writer,
                                           every_steps=cfg.log_every)
  peak = _peak_flops(cfg, step_fn)
  acc = _MetricsAccumulator()
  pending = None
  last: Dict[str, float] = {}
  preempted = False

  def consume(item):
    done_step, metrics, flops = item
    metrics = jax.device_get(metrics)
    if not bool(metrics["finite"]):
      msg = (f"Non-finite loss or gradient at step {done_step} (loss={float(metrics['loss'])}, "
             f"grad_norm={float(metrics['grad_norm'])}); the update was not applied.")
      if cfg.nonfinite_policy == "halt":
        checkpointer.wait_until_finished()  # so the step named below is really committed
        raise NonFiniteLossError(msg + " Stopping (nonfinite_policy=halt); the last good "
                                 f"checkpoint is kept: step {checkpointer.latest_step()} in "
                                 f"{checkpointer.directory}.")
      logging.warning("%s Skipped (nonfinite_policy=skip; %d skipped so far).", msg,
                      int(metrics["nonfinite_skips"]))
    acc.add(metrics, flops)
    if done_step % cfg.log_every == 0 or done_step == cfg.num_steps:
      nonlocal last
      last = acc.summary(cfg.global_batch, peak)
      writer.write_scalars(done_step, last)
      acc.reset()

  try:
    while step < cfg.num_steps:
      batch = next(batches)
      state, metrics = step_fn(state, batch, *step_args)
      step += 1
      if pending is not None:
        consume(pending)
      pending = (step, metrics, _flops_of_call(cfg, step_fn))
      report(step)
      save_now = step % cfg.checkpoint_every == 0 or step == cfg.num_steps
      preempted = checkpointer.reached_preemption(step)
      if save_now or preempted:
        consume(pending)
        pending = None
        checkpointer.save(step, state, data=data_state(), meta=meta(), force=True)
      for hook in hooks or ():
        hook(step, state)
      if preempted:
        logging.warning("Preemption signal: saved step %d, stopping.", step)
        break
    if pending is not None:
      consume(pending)
  except BaseException:
    # Let a save in flight finish (it holds a good state), without masking the error at hand.
    try:
      checkpointer.wait_until_finished()
    except Exception as e:  # reported, the original error is the one raised
      logging.error("The checkpoint save in flight failed too: %s", e)
    writer.flush()
    raise
  checkpointer.wait_until_finished()
  writer.flush()
  return {"state": state, "step": step, "preempted": preempted, "last_metrics": last}
