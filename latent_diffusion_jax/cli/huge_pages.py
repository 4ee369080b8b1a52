"""Opt-in: start training (train.py and the training benchmarks) with huge pages for malloc.

XLA:CPU allocates each call's temporary buffer afresh (785 MB for the cpu_small UNet's train step
at batch 4), and glibc serves an allocation that large with a new mapping: every call faults in
~190,000 4-KiB pages, 0.28-0.35 s of system time per step on a 2-core Xeon. With glibc's
`glibc.malloc.hugetlb=1` tunable malloc asks for transparent huge pages and those faults drop to
~600 per step: the cpu_small step at batch 4 ran 3-6% faster (bench/train_throughput.py).

It is off unless `LATENT_DIFFUSION_HUGE_PAGES=1` is in the environment, because on other work it
costs far more than it saves: the embedded demo's stage 2 (configs/shapes_ldm.py, batch 64) ran
at 0.9 steps/s with it and 1.6 without, 158 against 45 s of system time over 200 steps (same
machine, minutes apart); sampling stalled likewise (the cpu_small VAE decoder's median 149 ->
250 ms with transparent huge pages "madvise" and defrag "madvise").

The tunable is read when a process starts, so an entry point re-executes itself once with it set,
before anything else runs. Skipped where it cannot help: not Linux/glibc 2.35+, transparent huge
pages set to "never", or the tunable already in GLIBC_TUNABLES.
"""

import os
import platform
import sys
from typing import Dict, Optional

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_IN = "LATENT_DIFFUSION_HUGE_PAGES"
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
  """`env` with the tunable added, or None where it is not opted into, there already, or useless."""
  if env.get(OPT_IN, "0") != "1" or "glibc.malloc.hugetlb" in env.get("GLIBC_TUNABLES", ""):
    return None
  if sys.platform != "linux" or not _glibc_at_least(2, 35) or not _transparent_huge_pages_possible():
    return None
  tunables = env.get("GLIBC_TUNABLES", "")
  return dict(env, GLIBC_TUNABLES=f"{tunables}:{TUNABLE}" if tunables else TUNABLE)


def enabled() -> bool:
  """Whether this process runs with the tunable."""
  return TUNABLE in os.environ.get("GLIBC_TUNABLES", "")


def reexec_with_huge_pages() -> None:
  """Re-executes this process with the tunable where it is opted into and applies; returns where
  it does not (or the re-execution fails). Call first thing in an entry point's `__main__` block."""
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
