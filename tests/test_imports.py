"""Sampling, export and weight loading run beside PyTorch without loading tensorflow.

Users import our sampler or exporter next to diffusers in one process. With a CUDA build of
PyTorch, diffusers imports triton, and loading triton after tensorflow segfaults the process (both
carry their own LLVM; tensorflow's is exported globally and libtriton binds to it). So these entry
points must not load tensorflow at all, not even through a dependency: lint-imports checks our own
import statements, this test checks what a fresh process really loads.
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

USER_FACING = ("latent_diffusion_jax.sampling", "latent_diffusion_jax.artifacts.loader",
               "latent_diffusion_jax.cli.export")
# Present in the test extra; imported after ours, as a user's script would.
TORCH_SIDE = ("torch", "triton", "diffusers")

# Runs in a fresh interpreter: imports each module in turn and reports which forbidden modules are
# in sys.modules after it, and where in our package each lookup of a forbidden module came from
# (libraries also look them up without importing them, to see what is installed).
_PROBE = r"""
import importlib, importlib.abc, json, sys, traceback

FORBIDDEN = ("tensorflow", "tensorflow_datasets", "clu")
lookups = []

class Spy(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name in FORBIDDEN:
      ours = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()[:-1]
              if "latent_diffusion_jax" in f.filename]
      lookups.append(f"{name} from {ours[-1] if ours else 'a dependency'}")
    return None

sys.meta_path.insert(0, Spy())
report = {"loaded": {}, "skipped": [], "lookups": lookups}
for name in sys.argv[2:]:
  try:
    importlib.import_module(name)
  except ImportError:
    if name in sys.argv[1].split(","):
      report["skipped"].append(name)
      continue
    raise
  report["loaded"][name] = sorted(m for m in FORBIDDEN if m in sys.modules)
print(json.dumps(report))
"""


def test_user_facing_modules_and_torch_side_never_load_tensorflow():
  result = subprocess.run(
      [sys.executable, "-c", _PROBE, ",".join(TORCH_SIDE), *USER_FACING, *TORCH_SIDE],
      capture_output=True, text=True, cwd=REPO, timeout=300)
  # A negative return code is a signal: -11 is the segfault this test guards against.
  assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert not any(report["loaded"].values()), report
  assert set(report["loaded"]) == set(USER_FACING + TORCH_SIDE) - set(report["skipped"])
