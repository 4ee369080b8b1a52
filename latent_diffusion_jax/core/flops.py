"""FLOPs of compiled steps and of traced functions, a measured matmul peak, and MFU.

Two counts that check each other: `step_flops` asks XLA's cost analysis of a compiled executable
(everything XLA counts, elementwise work included, per device for a sharded program), and
`matmul_conv_flops` walks a function's jaxpr and adds 2*M*N*K for every matmul and convolution
(the analytic count; a train step is about 3x the forward's). `measure_matmul_peak` times a large
matmul on a device, the denominator of a model-FLOPs utilization (MFU) that means something on
machines without a datasheet peak (CPUs); `cached_matmul_peak` measures it once per device kind
and dtype in a process (what the trainer logs its MFU against).
"""

import math
import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.extend.core as jex
import jax.numpy as jnp


def step_flops(compiled: Any) -> Optional[float]:
  """FLOPs of one call of a compiled executable (`jax.jit(f).lower(...).compile()`), per device,
  from XLA's cost analysis; None where the backend reports none.

  XLA counts the body of a while loop once, whatever its trip count: a step with loops (scan,
  lax.map, fori_loop: gradient accumulation, "chunked" attention) is under-counted by them.
  `matmul_conv_flops` multiplies scans by their length.
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  flops = float(analysis["flops"])
  return flops if flops > 0 else None


def _dot_flops(eqn) -> float:
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  contract = math.prod(lhs.shape[d] for d in lc)
  batch = math.prod(lhs.shape[d] for d in lb)
  m = math.prod(s for d, s in enumerate(lhs.shape) if d not in lc and d not in lb)
  n = math.prod(s for d, s in enumerate(rhs.shape) if d not in rc and d not in rb)
  return 2.0 * batch * m * n * contract


def _conv_flops(eqn) -> float:
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  out = eqn.outvars[0].aval
  dn = eqn.params["dimension_numbers"]
  # rhs spec: (out feature dim, in feature dim, spatial dims...)
  kernel_in = rhs.shape[dn.rhs_spec[1]]
  kernel_spatial = math.prod(rhs.shape[d] for d in dn.rhs_spec[2:])
  del lhs
  # Each output element: kernel_in * kernel_spatial multiply-adds (kernel_in is already per group).
  return 2.0 * math.prod(out.shape) * kernel_in * kernel_spatial


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for item in (value if isinstance(value, (list, tuple)) else (value,)):
      if isinstance(item, jex.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jex.Jaxpr):
        yield item


def _jaxpr_flops(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    else:
      repeat = eqn.params.get("length", 1) if name == "scan" else 1
      if name == "cond":  # one branch runs: count the costliest
        total += max((_jaxpr_flops(j) for j in _sub_jaxprs(eqn)), default=0.0)
        continue
      if name == "while":  # trip count unknown: counted once
        repeat = 1
      total += repeat * sum(_jaxpr_flops(j) for j in _sub_jaxprs(eqn))
  return total


def matmul_conv_flops(fn: Callable, *args: Any, **kwargs: Any) -> float:
  """2*M*N*K summed over every matmul and convolution `fn(*args)` traces (scans multiplied by their
  length); elementwise work (norms, softmax, activations) is not counted."""
  return _jaxpr_flops(jax.make_jaxpr(fn, **kwargs)(*args).jaxpr)


def measure_matmul_peak(size: int = 2048, dtype: Any = jnp.float32, repeats: int = 5,
                        device: Optional[jax.Device] = None) -> float:
  """FLOP/s of the best of `repeats` timed [size, size] @ [size, size] matmuls on `device`."""
  device = device or jax.devices()[0]
  with jax.default_device(device):  # drawn on the device: no host array of size**2 floats
    a, b = (jax.random.normal(jax.random.key(i), (size, size), dtype) for i in range(2))
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * size ** 3 / best


# Matmul sides for a peak measurement: big enough to keep the device's units busy (an accelerator
# needs thousands), small enough to take well under a second (a CPU core runs ~50 GFLOP/s).
_PEAK_SIZES = {"cpu": 1024}
_ACCELERATOR_PEAK_SIZE = 8192
_PEAKS: Dict[Tuple[str, str, str], float] = {}


def cached_matmul_peak(dtype: Any = jnp.float32, device: Optional[jax.Device] = None) -> float:
  """`measure_matmul_peak` of `device` (default: the first) in `dtype`, measured once per
  (platform, device kind, dtype) in this process and then reused.

  On fake CPU devices (`--xla_force_host_platform_device_count`) all devices share the host's
  cores: the peak is the whole host's, so a per-device MFU there is a relative number."""
  device = device or jax.devices()[0]
  key = (device.platform, device.device_kind, jnp.dtype(dtype).name)
  if key not in _PEAKS:
    size = _PEAK_SIZES.get(device.platform, _ACCELERATOR_PEAK_SIZE)
    _PEAKS[key] = measure_matmul_peak(size=size, dtype=dtype, device=device)
  return _PEAKS[key]


def mfu(flops_per_step: float, step_seconds: float, peak_flops_per_second: float) -> float:
  """Model-FLOPs utilization: achieved FLOP/s over the peak (all per device, or all in total).

  Use model FLOPs (`matmul_conv_flops` of the forward, times 3 for a train step), not XLA's
  count: recomputation (remat, per-block attention backward) is work, not model progress."""
  return flops_per_step / step_seconds / peak_flops_per_second
