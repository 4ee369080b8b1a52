"""CLIP text encoders in and out of transformers' `CLIPTextModel` checkpoint layout.

transformers before v5 (and every SD 1.x/2.x `text_encoder/` directory on the Hub) stores keys as
`text_model.embeddings.token_embedding.weight`; transformers 5 writes them without the `text_model.`
prefix and reads both. Our Flax tree keeps the `text_model/` level, so import adds the prefix where it
is missing and export writes it, which every transformers version reads.
"""

from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion_jax.interop.convert import flax_to_torch, torch_to_flax
from latent_diffusion_jax.interop.files import load_config, load_state_dict
from latent_diffusion_jax.models.text_encoders import CLIPTextModel

_PREFIX = "text_model."
# Top-level modules of transformers 5's prefix-less CLIPTextModel layout.
_UNPREFIXED_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")


def _rename_torch_key(key: str) -> Optional[str]:
  if key.endswith("embeddings.position_ids"):
    return None  # an arange buffer that older transformers versions saved; not a parameter
  if key.startswith(_UNPREFIXED_ROOTS):
    return _PREFIX + key
  return key


def load_clip_text_model(directory: str, *, dtype: Any = jnp.float32, param_dtype: Any = None,
                         output_layer: str = "last", attention_impl: str = "auto",
                         allow_pickle: bool = False) -> Tuple[CLIPTextModel, Dict[str, Any]]:
  """Loads a transformers `CLIPTextModel` directory (config.json + model.safetensors).

  Args:
    directory: what `CLIPTextModel.save_pretrained` wrote, e.g. an SD pipeline's `text_encoder/`.
    dtype: computation dtype of the returned module.
    param_dtype: dtype of the returned parameters; default `dtype`, since a frozen encoder needs no
      float32 master copy.
    output_layer: "last" or "penultimate"; see `CLIPTextModel`.
    attention_impl: attention implementation for the module.
    allow_pickle: also accept `pytorch_model.bin` (unpickling can run code stored in the file).

  Returns:
    (module, params): use as `module.apply({"params": params}, input_ids)`. `params` is a nested
    dict of host numpy arrays; `jax.device_put` them with the shardings you want.

  Raises:
    WeightImportError: the weights do not fit the config; the message names the missing,
      unexpected and mis-shaped keys.
  """
  param_dtype = dtype if param_dtype is None else param_dtype
  module = CLIPTextModel.from_hf_config(
      load_config(directory), dtype=dtype, param_dtype=param_dtype, output_layer=output_layer,
      attention_impl=attention_impl)
  state_dict = load_state_dict(directory, allow_pickle=allow_pickle)
  reference = jax.eval_shape(
      module.init, jax.random.key(0), jnp.zeros((1, module.max_position_embeddings), jnp.int32))
  params = torch_to_flax(state_dict, reference["params"], what=f"CLIP text encoder {directory!r}",
                         rename=_rename_torch_key)
  return module, params


def clip_params_to_torch(params: Any, *, prefix: bool = True) -> Dict[str, np.ndarray]:
  """Converts `CLIPTextModel` params to a transformers `CLIPTextModel` state dict.

  Args:
    params: the module's params (the tree under "params"; a {"params": ...} dict is unwrapped;
      `nn.Partitioned` boxes are fine).
    prefix: keep the `text_model.` key prefix, which all transformers versions load; False gives
      transformers 5's own layout.

  Returns:
    PyTorch key -> numpy array in PyTorch layout, without the `position_ids` buffer.
  """
  if set(params) == {"params"}:
    params = params["params"]
  state_dict = flax_to_torch(params)
  if not prefix:
    state_dict = {k[len(_PREFIX):] if k.startswith(_PREFIX) else k: v for k, v in state_dict.items()}
  return state_dict
