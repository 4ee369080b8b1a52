"""Class-conditional models as diffusers components: unet/, vae/ (vqvae/), scheduler/.

diffusers' `UNet2DConditionModel` expresses a class condition through its class embedding
(`num_class_embeds`, `forward(..., class_labels=...)`), which is our class conditioner with
`model.conditioner.class_context=False` and `use_unet_class_embedding=True`: the UNet then reads
an all-zero one-token context and the label (index `num_classes` is the null class of
classifier-free guidance). The directory has no text encoder and no pipeline class of diffusers
fits it, so its parts load one by one:

  unet = UNet2DConditionModel.from_pretrained(out_dir, subfolder="unet")
  eps = unet(x, t, encoder_hidden_states=torch.zeros(b, 1, unet.config.cross_attention_dim),
             class_labels=labels).sample
  vae = AutoencoderKL.from_pretrained(out_dir, subfolder="vae")

class_labels.json records the number of classes, the null index and the class names.
"""

import os
from typing import Dict

from latent_diffusion_jax.interop.convert import flax_to_torch
from latent_diffusion_jax.interop.diffusers_config import (unet_to_diffusers_config,
                                                           vae_to_diffusers_config,
                                                           vq_to_diffusers_config)
from latent_diffusion_jax.interop.export_diffusers import (ExportError, COMPONENT_DIRS,
                                                           numpy_dtype, scheduler_config,
                                                           write_components, write_json)
from latent_diffusion_jax.models.bundle import ModelBundle


def check_class_exportable(bundle: ModelBundle) -> None:
  """Raises ExportError unless the bundle's condition lives in the UNet's class embedding."""
  cond, unet = bundle.conditioner, bundle.unet
  if cond.kind != "class":
    raise ExportError(f"The model's {cond.kind!r} conditioner has no diffusers equivalent; export "
                      "it with --format native (export_native).")
  if unet.num_class_embeds != cond.num_classes + 1 or getattr(cond.module, "context", True):
    raise ExportError(
        "This class-conditional model reads its class through cross-attention (the LDM paper's "
        "learned class context), which diffusers' UNet2DConditionModel cannot express. Train with "
        "--config.model.conditioner.class_context=False "
        "--config.model.conditioner.use_unet_class_embedding=True to export to diffusers, or "
        "export with --format native.")


def export_class_conditional(bundle: ModelBundle, out_dir: str, *, dtype: str = "float32",
                             scheduler: str = "ddim") -> Dict[str, str]:
  """Writes unet/, vae/ (vqvae/ for VQ), scheduler/ and class_labels.json; returns name -> path."""
  check_class_exportable(bundle)
  numpy_dtype(dtype)
  kind = bundle.first_stage_kind
  if kind == "vq":
    vae_cfg = vq_to_diffusers_config(bundle.vae, bundle.image_size, bundle.scaling_factor)
  else:
    vae_cfg = vae_to_diffusers_config(bundle.vae, bundle.image_size, bundle.scaling_factor)
  parts = (
      ("unet", "unet", unet_to_diffusers_config(bundle.unet, bundle.latent_size),
       flax_to_torch(bundle.unet_params), "diffusion_pytorch_model.safetensors"),
      ("vae", COMPONENT_DIRS[kind]["vae"], vae_cfg, flax_to_torch(bundle.vae_params),
       "diffusion_pytorch_model.safetensors"),
  )
  os.makedirs(out_dir, exist_ok=True)
  written = write_components(bundle, out_dir, parts, dtype)
  sched_cfg = scheduler_config(bundle.diffusion, scheduler)
  os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
  written["scheduler"] = os.path.join(out_dir, "scheduler", "scheduler_config.json")
  write_json(written["scheduler"], sched_cfg)
  cond = bundle.conditioner
  written["class_labels"] = os.path.join(out_dir, "class_labels.json")
  write_json(written["class_labels"], {
      "num_classes": cond.num_classes, "null_class": cond.num_classes,
      "class_names": list(cond.class_names), "scaling_factor": float(bundle.scaling_factor)})
  return written
