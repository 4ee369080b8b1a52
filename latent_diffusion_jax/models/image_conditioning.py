"""Spatially aligned conditions concatenated to the UNet's input (LDM paper sec. 3.3, "concat").

A model whose UNet takes more input channels than the first stage's latent has is conditioned
on an image-shaped input, concatenated after the noisy latents (the Stable Diffusion layouts):

  inpainting  [z_t, mask, masked-image latents]: latent + 1 + latent channels (9 for SD), the
              mask (1 = repaint) taken at latent resolution, the masked image (the image with the
              repainted region zeroed, i.e. mid-grey in [-1, 1]) encoded by the first stage
              (StableDiffusionInpaintPipeline).
  upscaling   [z_t, low-res image]: latent + 3 channels (7 for the x4 upscaler); the low-res
              RGB image in [-1, 1] has the latent's size and is noised to a "noise level" t by a
              separate schedule, and the level is the UNet's class label (the x4 upscaler's and
              Imagen's noise-conditioning augmentation; StableDiffusionUpscalePipeline).
  semantic    [z_t, map]: latent + num_classes channels; a segmentation map of class ids at
              pixel resolution becomes one-hot channels averaged over each latent cell.

`ImageConditioning` names the layout; the functions below compute the conditions, jittable,
for both sampling and training.
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp

from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.diffusion import schedules
from latent_diffusion_jax.diffusion.spec import DiffusionSpec

KINDS = ("inpainting", "upscaling", "semantic")
# The x4 upscaler's low_res_scheduler (a DDPMScheduler) and its pipeline's max_noise_level.
UPSCALER_NOISE = DiffusionSpec(schedule="scaled_linear", num_timesteps=1000, beta_start=0.0001,
                               beta_end=0.02)
UPSCALER_MAX_NOISE_LEVEL = 350


@dataclasses.dataclass(frozen=True)
class ImageConditioning:
  """What a bundle's extra UNet input channels hold.

  Attributes:
    kind: "inpainting", "upscaling" or "semantic" (see the module docstring).
    num_classes: semantic only: the segmentation map's number of classes.
    noise: upscaling only: the schedule that noises the low-res image (its noise level is a
      timestep of it).
    max_noise_level: upscaling only: the largest noise level the model was trained with.
  """
  kind: str
  num_classes: Optional[int] = None
  noise: Optional[DiffusionSpec] = None
  max_noise_level: Optional[int] = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise UserInputError(f"Unknown image conditioning {self.kind!r}; valid: {', '.join(KINDS)}.")
    if self.kind == "semantic" and not (isinstance(self.num_classes, int) and self.num_classes > 0):
      raise UserInputError(f"Semantic conditioning needs num_classes >= 1, got {self.num_classes!r}.")
    if self.kind == "upscaling":
      if self.noise is None:
        object.__setattr__(self, "noise", UPSCALER_NOISE)
      elif not isinstance(self.noise, DiffusionSpec):
        object.__setattr__(self, "noise", DiffusionSpec.from_dict(self.noise))
      if self.max_noise_level is None:
        object.__setattr__(self, "max_noise_level", UPSCALER_MAX_NOISE_LEVEL)

  def extra_channels(self, latent_channels: int) -> int:
    """Channels concatenated after the `latent_channels` noisy latent channels."""
    if self.kind == "inpainting":
      return latent_channels + 1
    if self.kind == "upscaling":
      return 3
    return self.num_classes

  def to_dict(self) -> Dict[str, Any]:
    out = {"kind": self.kind}
    if self.num_classes is not None:
      out["num_classes"] = self.num_classes
    if self.noise is not None:
      out["noise"] = self.noise.to_dict()
      out["max_noise_level"] = int(self.max_noise_level)
    return out

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "ImageConditioning":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise UserInputError(f"Unknown image conditioning settings {unknown}; valid: {sorted(names)}.")
    return cls(**values)


def infer(unet_in_channels: int, latent_channels: int,
          upscaling: bool = False) -> Optional[ImageConditioning]:
  """The conditioning a UNet's input width implies for sources that do not name it (diffusers
  directories, single files): none, inpainting (2 * latent + 1) or, when the source says it
  is an upscaler, upscaling (latent + 3). Other widths are an error."""
  if unet_in_channels == latent_channels and not upscaling:
    return None
  if upscaling and unet_in_channels == latent_channels + 3:
    return ImageConditioning("upscaling")
  if not upscaling and unet_in_channels == 2 * latent_channels + 1:
    return ImageConditioning("inpainting")
  raise UserInputError(
      f"The UNet takes {unet_in_channels} input channels and the first stage's latent has "
      f"{latent_channels}: neither a text-to-image ({latent_channels}), an inpainting "
      f"({2 * latent_channels + 1}) nor{' an' if upscaling else ', for an upscaler pipeline, an'} "
      f"upscaling ({latent_channels + 3}) layout.")


def check_channels(conditioning: Optional[ImageConditioning], unet_in_channels: int,
                   latent_channels: int) -> None:
  """Raises UserInputError unless the UNet's input width is latent + extra channels."""
  extra = 0 if conditioning is None else conditioning.extra_channels(latent_channels)
  if unet_in_channels != latent_channels + extra:
    what = "no image conditioning" if conditioning is None else f"{conditioning.kind} conditioning"
    raise UserInputError(
        f"The UNet takes {unet_in_channels} input channels, but {what} with a "
        f"{latent_channels}-channel latent needs {latent_channels + extra}.")


def binarize_mask(mask: jnp.ndarray) -> jnp.ndarray:
  """A mask in [0, 1] -> exactly 0 or 1 (1 = repaint), thresholded at 0.5 as diffusers does."""
  return (mask >= 0.5).astype(jnp.float32)


def masked_image(image: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """The image [B, H, W, 3] in [-1, 1] with the region to repaint (mask [B, H, W, 1]) zeroed."""
  return image * (mask < 0.5).astype(image.dtype)


def mask_at_latent_size(mask: jnp.ndarray, factor: int) -> jnp.ndarray:
  """A pixel mask [B, H, W, 1] -> [B, H/f, W/f, 1]: the top-left pixel of every f x f cell,
  which is what torch's nearest `interpolate` picks (StableDiffusionInpaintPipeline)."""
  return mask[:, ::factor, ::factor, :]


def semantic_map_channels(labels: jnp.ndarray, num_classes: int, factor: int) -> jnp.ndarray:
  """Class ids [B, H, W] -> [B, H/f, W/f, num_classes]: the fraction of each latent cell's pixels
  in every class (one-hot, then f x f average pooling)."""
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  b, h, w, c = one_hot.shape
  return one_hot.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def noise_low_res(conditioning: ImageConditioning, image: jnp.ndarray, noise: jnp.ndarray,
                  noise_level: jnp.ndarray) -> jnp.ndarray:
  """The low-res image [B, h, w, 3] in [-1, 1] noised to `noise_level` [B] (int timesteps of
  `conditioning.noise`), as the upscaler's low_res_scheduler.add_noise does."""
  schedule = conditioning.noise.noise_schedule()
  return schedules.add_noise(schedule, image.astype(jnp.float32), noise.astype(jnp.float32),
                             noise_level.astype(jnp.int32))
