"""ControlNets at sampling time: control images in, summed residuals into the UNet.

  control = Control(controlnet, params, image, scale=1.0)          # image [H, W, C] in [0, 1]
  images = generate(bundle, prompts, controlnets=[control, ...], guess_mode=False)

As diffusers' StableDiffusionControlNetPipeline (and its MultiControlNetModel for several): each
ControlNet reads the latents, the step's timestep, the prompt embeddings and its control image, and
the residuals of all of them, each times its scale, are summed into the UNet's skips and mid block.
With classifier-free guidance the ControlNets run on both halves of the doubled batch (the control
image repeated), so control steers the unconditional prediction too; in guess mode they run on the
conditional half only, with residuals ramped from 0.1 to 1 from the first skip to the mid block,
and the unconditional half gets none.
"""

import dataclasses
import os
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np

from latent_diffusion_jax.core.errors import FlagError, MissingInputError, UserInputError
from latent_diffusion_jax.models.controlnet import ControlNetModel, check_matches_unet


class Control(NamedTuple):
  """One ControlNet with its control image and scale.

  Attributes:
    controlnet: the module.
    params: its params.
    image: the control image, [H, W, C] for every prompt or [N, H, W, C] one per prompt; uint8
      (0-255) or float in [0, 1]; C = controlnet.conditioning_channels ([H, W] for one channel).
      H x W is the sampled size in pixels.
    scale: multiplies its residuals (diffusers' controlnet_conditioning_scale).
  """
  controlnet: ControlNetModel
  params: Any
  image: Any
  scale: float = 1.0


def _as_float_images(image: Any, channels: int, what: str) -> np.ndarray:
  image = np.asarray(image)
  shape = image.shape
  if image.dtype == np.uint8:
    image = image.astype(np.float32) / 255.0
  image = image.astype(np.float32)
  if channels == 1 and image.ndim in (2, 3) and (image.ndim == 2 or image.shape[-1] != 1):
    image = image[..., None]
  if image.ndim == 3:
    image = image[None]
  if image.ndim != 4 or image.shape[-1] != channels:
    raise UserInputError(f"{what} has shape {shape}; expected [H, W, {channels}] or "
                         f"[N, H, W, {channels}] (the ControlNet takes {channels} channels).")
  return image


def prepare(controls: Sequence[Control], unet: Any, num_images: int, height: int,
            width: int, downsample_factor: Optional[int] = None
            ) -> Tuple[List[np.ndarray], np.ndarray]:
  """Checks the ControlNets against the base UNet and the images against the sampled size.

  Args:
    controls: the ControlNets with their images and scales.
    unet: the base UNet.
    num_images, height, width: the images sampled.
    downsample_factor: the first stage's; each hint encoder must downsample as much.

  Returns:
    (one float32 [num_images, height, width, C] array per ControlNet, float32 scales [K]).

  Raises:
    UserInputError: a ControlNet whose layout does not fit `unet` (naming the field), or a control
      image of another size, channel count or count than the images sampled.
  """
  images = []
  for i, control in enumerate(controls):
    what = f"Control image {i + 1}"
    check_matches_unet(control.controlnet, unet, what=f"ControlNet {i + 1}")
    hint = control.controlnet.hint_downsampling
    if downsample_factor is not None and hint != downsample_factor:
      raise UserInputError(
          f"ControlNet {i + 1} does not fit the base model: its hint encoder "
          f"(conditioning_embedding_out_channels "
          f"{tuple(control.controlnet.conditioning_embedding_out_channels)}) downsamples control "
          f"images by {hint}, the first stage by {downsample_factor}.")
    image = _as_float_images(control.image, control.controlnet.conditioning_channels, what)
    if image.shape[1:3] != (height, width):
      raise UserInputError(
          f"{what} is {image.shape[2]}x{image.shape[1]} pixels (width x height), but the images "
          f"are sampled at {width}x{height}: resize it, or sample at its size (--height "
          f"{image.shape[1]} --width {image.shape[2]}).")
    if image.shape[0] not in (1, num_images):
      raise UserInputError(f"{what}: {image.shape[0]} images for {num_images} prompts; give one "
                           "for all or one per prompt.")
    if image.min() < 0 or image.max() > 1:
      raise UserInputError(f"{what} has values in [{image.min():.3g}, {image.max():.3g}]; control "
                           "images are uint8 or floats in [0, 1].")
    images.append(np.broadcast_to(image, (num_images, *image.shape[1:])))
  return images, np.asarray([float(c.scale) for c in controls], np.float32)


def residuals(controlnets: Sequence[ControlNetModel], params: Sequence[Any],
              images: Sequence[jnp.ndarray], scales: jnp.ndarray, x: jnp.ndarray, t: jnp.ndarray,
              context: jnp.ndarray, class_labels: Optional[jnp.ndarray], *, guided: bool,
              guess_mode: bool) -> Tuple[Tuple[jnp.ndarray, ...], jnp.ndarray]:
  """The summed (down, mid) residuals of `controlnets` for the UNet's batch.

  Args:
    controlnets, params: the modules and their params.
    images: one control image batch [B, H, W, C] per ControlNet.
    scales: float [K], one per ControlNet.
    x, t, context, class_labels: the UNet's inputs; with guidance a doubled batch [2B]
      (unconditional half first, as `samplers.classifier_free_guidance` builds it).
    guided: whether the batch is doubled for classifier-free guidance.
    guess_mode: ControlNets see the conditional half only, with ramped scales.
  """
  only_cond = guided and guess_mode
  if only_cond:
    half = x.shape[0] // 2
    x, t, context = x[half:], t[half:], context[half:]
    class_labels = None if class_labels is None else class_labels[half:]
  total_down, total_mid = None, None
  for k, (controlnet, p, image) in enumerate(zip(controlnets, params, images)):
    if guided and not guess_mode:
      image = jnp.concatenate([image, image], axis=0)
    down, mid = controlnet.apply({"params": p}, x, t, context, image, scales[k], class_labels,
                                 guess_mode=guess_mode)
    if total_down is None:
      total_down, total_mid = list(down), mid
    else:
      total_down = [a + b for a, b in zip(total_down, down)]
      total_mid = total_mid + mid
  if only_cond:
    pad = lambda r: jnp.concatenate([jnp.zeros_like(r), r], axis=0)  # noqa: E731
    total_down, total_mid = [pad(r) for r in total_down], pad(total_mid)
  return tuple(total_down), total_mid


# --- command line: --controlnet PATH --control_image IMG --control_scale S (paired in order) ---


@dataclasses.dataclass(frozen=True)
class ControlSpec:
  """A ControlNet named on the command line: weight source, control image file, scale."""
  source: str
  image: str
  scale: float = 1.0


def pair_flags(controlnets: Sequence[str], images: Sequence[str],
               scales: Sequence[float]) -> List[ControlSpec]:
  """Pairs repeated --controlnet, --control_image and --control_scale flags in order.

  Scales: none (1.0 each), one (for all), or one per ControlNet.
  """
  controlnets, images, scales = list(controlnets), list(images), list(scales)
  if len(images) != len(controlnets):
    raise FlagError(f"Got {len(controlnets)} --controlnet and {len(images)} --control_image; give "
                    "one control image per ControlNet, in the same order.")
  if scales and len(scales) not in (1, len(controlnets)):
    raise FlagError(f"Got {len(scales)} --control_scale for {len(controlnets)} --controlnet; give "
                    "none (1.0), one for all, or one per ControlNet.")
  if scales and not controlnets:
    raise FlagError("--control_scale without --controlnet.")
  scales = scales * len(controlnets) if len(scales) == 1 else scales or [1.0] * len(controlnets)
  return [ControlSpec(c, i, float(s)) for c, i, s in zip(controlnets, images, scales)]


def read_control_image(path: str, channels: int) -> np.ndarray:
  """A control image file as uint8 [H, W, channels] (RGB, or grayscale for one channel)."""
  if not os.path.isfile(path):
    raise MissingInputError(f"No control image at {path!r}.")
  from PIL import Image
  try:
    with Image.open(path) as image:
      array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
  except OSError as e:
    raise UserInputError(f"Cannot read the control image {path!r}: {e}") from None
  return array[..., None] if array.ndim == 2 else array
