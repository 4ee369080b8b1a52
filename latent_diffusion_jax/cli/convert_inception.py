"""Converts pytorch-fid's Inception weights into the safetensors file the FID metric loads.

  python -m latent_diffusion_jax.cli.convert_inception \
      --pth pt_inception-2015-12-05-6726825d.pth --out weights/inception_fid.safetensors

The input is pytorch-fid's release asset (https://github.com/mseitzer/pytorch-fid/releases/
download/fid_weights/pt_inception-2015-12-05-6726825d.pth), read with
`torch.load(weights_only=True)`, which rebuilds tensors and nothing else; torch is needed for this
step only. A .safetensors copy of the same state dict works too. A file carrying the hub name
`pt_inception-2015-12-05-<hash>.pth` is checked against the hash in its name.
"""

import argparse
import hashlib
import os
import pickle
import re
import sys
from typing import Optional, Sequence

from latent_diffusion_jax.cli import errors
from latent_diffusion_jax.core.errors import InputFileError
from latent_diffusion_jax.evaluation.feature_nets import inception_weights

# torch.hub names files <name>-<first hex digits of their sha256>.<ext>.
_HUB_NAME = re.compile(r"pt_inception-2015-12-05-([0-9a-f]{8,})\.pth$")


def _check_hub_hash(path: str) -> None:
  match = _HUB_NAME.search(path)
  if not match:
    return
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  if not digest.hexdigest().startswith(match.group(1)):
    raise InputFileError(
        f"{path}: sha256 {digest.hexdigest()[:16]}... does not start with {match.group(1)}, the "
        "hash in its name; the download is damaged or a different file. Download it again from "
        f"{inception_weights.PTH_URL}")


def convert(pth: str, out: str) -> str:
  """Reads pytorch-fid's state dict at `pth`, writes our safetensors file at `out`."""
  from latent_diffusion_jax.interop.files import load_state_dict
  if os.path.isfile(pth):
    _check_hub_hash(pth)
  try:
    state_dict = load_state_dict(pth, allow_pickle=True)  # torch.load(weights_only=True)
  except (RuntimeError, pickle.UnpicklingError, EOFError) as error:
    raise InputFileError(f"{pth} is not a readable PyTorch state dict: {error}") from error
  variables = inception_weights.convert_state_dict(state_dict)
  return inception_weights.save(variables, out)


def main(argv: Optional[Sequence[str]] = None) -> str:
  parser = argparse.ArgumentParser(
      prog="python -m latent_diffusion_jax.cli.convert_inception", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--pth", required=True, help=f"pytorch-fid's {inception_weights.PTH_NAME}.")
  parser.add_argument("--out", default=inception_weights.DEFAULT_WEIGHTS,
                      help="Output .safetensors path (default: %(default)s).")
  args = parser.parse_args(argv)
  return _run(args.pth, args.out)


@errors.exits_on_user_error("convert_inception")
def _run(pth: str, out: str) -> str:
  written = convert(pth, out)
  print(f"Wrote {written}: the FID Inception-v3 (pool3 2048-d features, 1008-way logits).")
  return written


if __name__ == "__main__":
  main(sys.argv[1:])
