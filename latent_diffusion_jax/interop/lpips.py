"""Converts torchvision's VGG16 and the LPIPS v0.1 heads into one safetensors file for `lpips.LPIPS`.

  python -m latent_diffusion_jax.interop.lpips --vgg16 vgg16-397923af.pth \
      --lpips vgg.pth --out lpips_vgg.safetensors --allow_pickle

Inputs: torchvision's `vgg16(weights="IMAGENET1K_V1").state_dict()` file (`features.<i>.weight`;
the classifier is dropped) and the LPIPS VGG heads (`lin<l>.model.1.weight`, as in the lpips
package's weights/v0.1/vgg.pth and taming-transformers' vgg.pth). A whole-LPIPS state dict with
`net.slice<k>.<i>.*` trunk keys works too. Safetensors inputs need no flag. Then set
`--config.autoencoder.lpips_weights=lpips_vgg.safetensors`.
"""

import argparse
import re
import sys
from typing import Any, Dict, Mapping, Sequence

import numpy as np
from latent_diffusion_jax.core.errors import UserInputError

_SLICE_KEY = re.compile(r"^(?:net\.)?slice\d\.(\d+)\.(weight|bias)$")
_FEATURE_KEY = re.compile(r"^(?:module\.)?features\.(\d+)\.(weight|bias)$")
_LIN_KEY = re.compile(r"^(?:module\.)?lin(\d)\.model\.1\.weight$")


def convert(vgg_state_dict: Mapping[str, np.ndarray],
            lpips_state_dict: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  """The `lpips.LPIPS` param tree from the two PyTorch state dicts (numpy values).

  Raises:
    ValueError: keys or shapes do not fit VGG16 + 5 heads, or a head has negative weights (LPIPS
      heads are trained non-negative, so negative ones mean a wrong file).
  """
  from latent_diffusion_jax.interop.convert import torch_to_flax
  from latent_diffusion_jax.models.lpips import LPIPS, abstract_params
  merged = {}
  for key, value in list(vgg_state_dict.items()) + list(lpips_state_dict.items()):
    value = np.asarray(value, np.float32)
    if m := (_FEATURE_KEY.match(key) or _SLICE_KEY.match(key)):
      merged[f"features.{m.group(1)}.{m.group(2)}"] = value
    elif m := _LIN_KEY.match(key):
      if np.any(value < 0):
        raise UserInputError(f"LPIPS head {key} has negative weights; is this an LPIPS v0.1 file?")
      # A bias-free 1x1 conv [1, C, 1, 1] is our Dense [C -> 1]: PyTorch linear layout [1, C].
      merged[f"lin.{m.group(1)}.weight"] = value.reshape(value.shape[0], value.shape[1])
  return torch_to_flax(merged, abstract_params(LPIPS()), what="VGG16 + LPIPS heads")


def save(params: Any, path: str) -> str:
  """Writes the param tree with '/'-joined paths as keys (our layout: HWIO kernels)."""
  from flax import traverse_util
  from safetensors.numpy import save_file
  flat = traverse_util.flatten_dict(params)
  save_file({"/".join(k): np.ascontiguousarray(v, np.float32) for k, v in flat.items()}, path,
            metadata={"format": "latent_diffusion_jax.lpips_vgg16"})
  return path


def main(argv: Sequence[str] | None = None) -> str:
  parser = argparse.ArgumentParser(
      prog="python -m latent_diffusion_jax.interop.lpips", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--vgg16", required=True,
                      help="torchvision VGG16 ImageNet state dict (.pth or .safetensors).")
  parser.add_argument("--lpips", required=True,
                      help="LPIPS v0.1 VGG heads (vgg.pth or .safetensors).")
  parser.add_argument("--out", required=True, help="Output .safetensors path.")
  parser.add_argument(
      "--allow_pickle", action="store_true",
      help="Read .pth/.pt/.ckpt inputs. The public VGG16 and LPIPS weights are published only as "
           "PyTorch pickles, and unpickling can run code stored in the file, so it is refused "
           "unless you pass this flag for files whose origin you trust. Loading uses "
           "torch.load(weights_only=True), which only rebuilds tensors.")
  args = parser.parse_args(argv)
  from latent_diffusion_jax.interop.files import load_state_dict
  vgg = load_state_dict(args.vgg16, allow_pickle=args.allow_pickle)
  heads = load_state_dict(args.lpips, allow_pickle=args.allow_pickle)
  out = save(convert(vgg, heads), args.out)
  print(f"Wrote {out}; use it with --config.autoencoder.lpips_weights={out}")
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
