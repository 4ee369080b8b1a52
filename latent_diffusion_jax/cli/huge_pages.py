"""Start training (train.py and the training benchmarks) with huge pages for malloc.

XLA:CPU allocates each call's temporary buffer afresh (785 MB for the cpu_small UNet's train step
at batch 4), and glibc serves an allocation that large with a new mapping: every call faulted in
~190,000 4-KiB pages, 0.28 s of system time per step on a 2-core Xeon. With glibc's
`glibc.malloc.hugetlb=1` tunable malloc asks for transparent huge pages and the faults drop to
~800 per step: the step ran 3-6% faster (bench/train_throughput.py; PyTorch's step did not
change). The tunable is read when a process starts, so an entry point re-executes itself once
with it set, before anything else runs.

Sampling (sample.py, bench/sample_latency.py, bench/sample_pieces.py) starts without it: there the
huge pages stalled calls instead (transparent huge pages "madvise" with defrag "madvise", i.e.
compaction on fault). The cpu_small VAE decoder's median over 10 calls went from 149 to 250 ms,
single calls to 300-500 ms, and 10-step guided sampling at batch 8 from 1.57 to 1.80 s per image
(diffusers' pipeline in the same process from 1.48 to 2.06 s).

Skipped where it cannot help: not Linux/glibc 2.35+, transparent huge pages set to "never",
the tunable already in GLIBC_TUNABLES, or LATENT_DIFFUSION_HUGE_PAGES=0 in the environment.
"""

import os
import platform
import sys
from typing import Dict, Optional

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "LATENT_DIFFUSION_HUGE_PAGES"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_at_least(major: int, minor: int) -> bool:
  lib, version = platform.libc_ver()
  if lib != "glibc" or not version:
    return False
  try:
    have = tuple(int(x) for x in version.split(".")[:2])
  except ValueError:
    return False
  return have >= (major, minor)


def _transparent_huge_pages_possible() -> bool:
  try:
    with open(_THP) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def environment_with_huge_pages(env: Dict[str, str]) -> Optional[Dict[str, str]]:
  """`env` with the tunable added, or None where it is there already, opted out of, or useless."""
  if env.get(OPT_OUT, "1") == "0" or "glibc.malloc.hugetlb" in env.get("GLIBC_TUNABLES", ""):
    return None
  if sys.platform != "linux" or not _glibc_at_least(2, 35) or not _transparent_huge_pages_possible():
    return None
  tunables = env.get("GLIBC_TUNABLES", "")
  return dict(env, GLIBC_TUNABLES=f"{tunables}:{TUNABLE}" if tunables else TUNABLE)


def enabled() -> bool:
  """Whether this process runs with the tunable."""
  return TUNABLE in os.environ.get("GLIBC_TUNABLES", "")


def reexec_with_huge_pages() -> None:
  """Re-executes this process with the tunable where it applies; returns where it does not (or the
  re-execution fails). Call first thing in an entry point's `__main__` block."""
  env = environment_with_huge_pages(dict(os.environ))
  if env is None:
    return
  argv = [sys.executable] + list(getattr(sys, "orig_argv", sys.argv)[1:])
  try:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
  except OSError:
    return
