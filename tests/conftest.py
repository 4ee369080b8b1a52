"""Test set-up: 8 fake CPU devices for sharding tests, fp32 matmuls, no network, fast compiles.

Compile time dominates this suite on a 2-core CPU, so tests (and the subprocesses they start,
which inherit the environment) trade XLA's backend optimizations for faster compiles and share a
persistent compilation cache; neither changes what is computed. Random init uses the
non-partitionable threefry scheme, which compiles about 2.5x faster on CPU; values differ from the
partitionable scheme but are equally deterministic and the same on every mesh.
"""

import importlib.util
import os
import sys
import tempfile

# Must happen before jax is imported anywhere.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "false")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "ldj_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# With a CUDA build of PyTorch, triton is installed, and loading its library after tensorflow
# segfaults: tensorflow puts libtensorflow_framework.so.2 (with its own LLVM, exported) in the
# process's global symbol scope, and libtriton.so's static initializers then bind to that LLVM's
# llvm::DebugCounter::instance() and crash. diffusers imports torch._dynamo, which imports triton,
# and our data modules import tensorflow, so one pytest process needs both. Loaded first, libtriton
# binds to its own LLVM (Python dlopens extensions RTLD_NOW | RTLD_LOCAL, so tensorflow loaded
# later cannot rebind or see it), and both work side by side. The package itself never needs this:
# only data readers and training import tensorflow (checked by lint-imports), none of them torch.
if importlib.util.find_spec("triton") is not None:  # the CPU build of PyTorch comes without it
  if "tensorflow" in sys.modules:  # e.g. a pytest plugin: say so rather than segfault later
    raise RuntimeError("tensorflow was imported before tests/conftest.py could load triton")
  import triton  # noqa: E402,F401

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
