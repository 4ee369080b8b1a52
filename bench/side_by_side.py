"""What bench/train_throughput.py and bench/sample_latency.py share: the model configs by name,
common flags, peak-memory probes, and the environment line printed with every table."""

import argparse
import datetime
import json
import os
import platform
import sys
import threading
import time

import numpy as np
from typing import Any, Callable, Dict, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from latent_diffusion_jax.cli import huge_pages  # noqa: E402
from latent_diffusion_jax.core.config import base_config, load_config_file, tiny_models

CONFIG_FILES = {"tiny": "configs/sd15.py:tiny", "sd15": "configs/sd15.py",
                "sd21_base": "configs/sd21_base.py"}
CONFIG_NAMES = ("tiny", "cpu_small", "sd15", "sd21_base")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_small_config():
  """Issue 18's CPU model: an SD-structured UNet with block channels 64/128/256/256, two layers
  per block, attention at the first three levels (8 heads), 32x32 latents (256 px through an f8
  VAE), float32. The VAE and CLIP are shrunk (the sampling benchmark runs them once per image,
  the UNet 2 x steps times); CLIP keeps SD's width 768 and 77 tokens for the cross-attention."""
  c = base_config()
  tiny_models(c, unet_channels=(64, 128, 256, 256))
  u = c.model.unet
  u.attention_levels = (True, True, True, False)
  u.layers_per_block = 2
  u.norm_num_groups = 32
  u.num_heads = 8
  c.model.image_size = 256
  c.model.vae.block_out_channels = (32, 64, 128, 128)
  c.model.vae.norm_num_groups = 32
  clip = c.model.text_encoder.clip
  clip.hidden_size, clip.intermediate_size = 768, 3072
  clip.num_hidden_layers, clip.num_attention_heads = 2, 12
  u.cross_attention_dim = clip.hidden_size
  return c


def load_named_config(name: str):
  """A config by benchmark name (CONFIG_NAMES) or as `path/to/config.py[:arg]`."""
  if name == "cpu_small":
    return cpu_small_config()
  spec = CONFIG_FILES.get(name, name)
  path, sep, arg = spec.partition(":")
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(REPO, path)
  return load_config_file(path + sep + arg)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", default="cpu_small",
                      help=f"one of {', '.join(CONFIG_NAMES)}, or path/to/config.py[:arg]")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                      help="compute dtype of both sides (params stay float32; torch autocasts)")
  parser.add_argument("--attention", default=None,
                      help="our attention implementation (models/attention.py); default: the config's")
  parser.add_argument("--compare_attention", default="",
                      help="also time ours with this attention implementation, in the same run")
  parser.add_argument("--mesh", default="-1,1,1", help="our (data, fsdp, tensor) mesh sizes")
  parser.add_argument("--json", default="", help="also write the results to this JSON file")
  parser.add_argument("--torch_compile", default="auto", choices=("auto", "off"),
                      help="also time torch.compile (auto: where it compiles; off: skip it)")


def configure(args) -> Any:
  config = load_named_config(args.config)
  config.model.dtype = args.dtype
  if args.attention:
    config.model.attention_impl = args.attention
  config.mesh.shape = tuple(int(x) for x in args.mesh.split(","))
  return config


def torch_device() -> str:
  import torch
  return "cuda" if torch.cuda.is_available() else "cpu"


def torch_autocast(dtype_name: str, device: str):
  """Autocast for a half-precision run (our float32 params with a half compute dtype), else a no-op."""
  import contextlib
  import torch
  if dtype_name == "float32":
    return contextlib.nullcontext()
  return torch.autocast(device, dtype=getattr(torch, dtype_name))


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
  """Peak memory while the `with` block runs: the accelerator's allocator statistics where they
  exist (jax `memory_stats`, `torch.cuda.max_memory_allocated`), else the process RSS sampled
  every 5 ms (the rise over the RSS at entry, so a second measurement in the same process does
  not count the first one's buffers)."""

  def __init__(self, framework: str):
    self.framework = framework
    self.bytes: Optional[int] = None
    self.source = ""

  def _device_peak(self) -> Optional[int]:
    if self.framework == "jax":
      import jax
      stats = jax.devices()[0].memory_stats() or {}
      return stats.get("peak_bytes_in_use")
    import torch
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None

  def __enter__(self):
    if self.framework == "torch" and torch_device() == "cuda":
      import torch
      torch.cuda.reset_peak_memory_stats()
    self._base = _rss_bytes()
    self._peak = self._base
    self._stop = threading.Event()

    def sample():
      while not self._stop.wait(0.005):
        self._peak = max(self._peak, _rss_bytes())

    self._thread = threading.Thread(target=sample, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self._peak = max(self._peak, _rss_bytes())
    device = self._device_peak()
    if device:
      self.bytes, self.source = int(device), "device allocator peak"
    else:
      self.bytes, self.source = self._peak - self._base, "process RSS rise"
    return False


def timed(fn: Callable[[], Any], sync: Callable[[Any], Any], steps: int) -> Dict[str, float]:
  """Seconds per call of `fn`: each of `steps` calls waited for (`sync`) and timed on its own,
  after one untimed call. The median is what the tables report: on a machine shared with other
  jobs it is far steadier than the mean, and one call of a train step is long enough that the
  wait between calls costs nothing measurable."""
  sync(fn())
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t)
  return {"median": float(np.median(times)), "best": min(times), "mean": float(np.mean(times))}


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
  """Median wall time of `fn()` over `repeats` calls after an untimed one, in milliseconds."""
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times)) * 1e3


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo on Linux), else the architecture: same-run ratios move
  with it (oneDNN and XLA use different vector extensions)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def environment() -> Dict[str, Any]:
  import jax
  import torch
  import diffusers
  return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "machine": f"{cpu_model()}, {os.cpu_count()} CPUs",
          "jax_devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
          "jax": jax.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
          "torch_device": torch_device(), "glibc_huge_pages": huge_pages.enabled()}


def write_json(path: str, results: Dict[str, Any]) -> None:
  if path:
    with open(path, "w") as f:
      json.dump(results, f, indent=2, sort_keys=True)
