"""Import torchvision (and what builds on it: pytorch-fid, timm, open_clip) for the parity tests.

The torchvision wheels on the package index are linked against CUDA builds of torch; beside the CPU
build of torch this machine installs, their compiled operators (nms, roi_align, ...) do not load and
`import torchvision` raises while registering fake kernels for them. The parity tests use only
torchvision's pure-PyTorch model definitions (Inception-v3 blocks), so when the plain import fails
the registration of those kernels is skipped and the import is retried. With a matching torch
(a CUDA venv) the plain import succeeds and nothing is patched.
"""

import sys
from unittest import mock


def import_torchvision():
  try:
    import torchvision  # noqa: F401
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
