"""Import torchvision (and what builds on it: pytorch-fid, timm, open_clip) for the parity tests.

These references live outside the venv's site-packages, in `<venv>/parity_refs` (the Makefile
installs them there with `pip install --target`; `$PARITY_REFS` names another folder): the
torchvision wheels on the package index are linked against CUDA builds of torch, and installed
beside the CPU build of torch they break `import torchvision`, and with it every transformers and
diffusers model class that imports it. Only the tests that need a reference put the folder on
sys.path, through `import_torchvision()`.

Beside a CPU torch the wheel's compiled operators (nms, roi_align, ...) do not load and importing
torchvision raises while it registers fake kernels for them; the parity tests use only its
pure-PyTorch model definitions (Inception-v3 blocks), so then that registration is skipped and the
import retried. With a matching torch the plain import succeeds and nothing is patched.
"""

import os
import sys
from unittest import mock


def _add_refs_folder() -> None:
  folder = os.environ.get("PARITY_REFS") or os.path.join(sys.prefix, "parity_refs")
  if os.path.isdir(folder) and folder not in sys.path:
    sys.path.append(folder)


def import_torchvision():
  _add_refs_folder()
  try:
    import torchvision  # noqa: F401
  except ModuleNotFoundError as error:
    raise ModuleNotFoundError(
        "the parity references (torchvision, pytorch-fid, open_clip) are missing: `make venv` "
        f"installs them into {os.path.join(sys.prefix, 'parity_refs')}") from error
  except RuntimeError as error:
    if "torchvision::" not in str(error):
      raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
      del sys.modules[name]
    skip = lambda *args, **kwargs: (lambda fn: fn)  # noqa: E731
    with mock.patch("torch.library.register_fake", skip), \
        mock.patch("torch.library.register_autograd", lambda *args, **kwargs: None):
      import torchvision  # noqa: F401
  return sys.modules["torchvision"]
