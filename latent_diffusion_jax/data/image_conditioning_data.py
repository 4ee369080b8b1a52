"""The batch fields an image-conditioned run (`model.image_conditioning.kind`) needs from the
shapes data, beside "images":

  inpainting  nothing more: masks are drawn in the train step (data/inpaint_masks.py) and the
              masked image comes from "images" (kept even when the latents are pre-encoded)
  upscaling   "low_res": uint8 [N, H/f, W/f, 3], the configured degradation (data/degradation.py)
  semantic    "segmentation": uint8 class ids [N, H, W] by model.image_conditioning.segmentation
              (data/segmentation.py)
"""

from typing import Dict

import ml_collections as mc
import numpy as np

from latent_diffusion_jax.data import degradation, segmentation


def kind(config: mc.ConfigDict) -> str:
  ic = config.model.get("image_conditioning")
  return ic.kind if ic is not None else ""


def low_res_factor(config: mc.ConfigDict) -> int:
  """`model.image_conditioning.low_res_factor`, or the first stage's factor when 0."""
  factor = int(config.model.image_conditioning.low_res_factor)
  return factor or 2 ** (len(config.model.vae.block_out_channels) - 1)


def keeps_images(config: mc.ConfigDict) -> bool:
  """Whether batches carry the images even with pre-encoded latents (inpainting masks them)."""
  return kind(config) == "inpainting"


def shapes_fields(config: mc.ConfigDict, arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """The extra fields of a shapes split (`shapes_source.load_split` arrays) for the run's kind."""
  ic = config.model.get("image_conditioning")
  if kind(config) == "upscaling":
    return {"low_res": degradation.degrade(arrays["images"], low_res_factor(config),
                                           ic.degradation)}
  if kind(config) == "semantic":
    labels = segmentation.shapes_segmentation(arrays["images"], arrays["color"], arrays["shape"],
                                              ic.segmentation)
    segmentation.check_classes(labels, int(ic.num_classes), "the shapes segmentation maps")
    return {"segmentation": labels}
  return {}
