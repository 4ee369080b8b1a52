"""The image-shaped conditions of an image-conditioned train step (LDM "concat" conditioning),
built with the functions sampling uses (`models.image_conditioning`), so that a trained model
sees at training time exactly the channels `sampling.image_conditioned` gives it:

  inpainting  [mask at latent size, first-stage latents of the masked image]: a random mask per
              example (data/inpaint_masks.py) drawn from the step's key, the image with the
              masked region zeroed, encoded by the frozen first stage (a posterior sample, times
              the latent scale factor, as the sampler encodes it).
  upscaling   [low-res image noised to a random level]: the level, uniform in
              noise_level_range, is also the UNet's class label (the x4 upscaler's noise
              augmentation).
  semantic    the segmentation map as per-class shares of each latent cell.
"""

import dataclasses
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections as mc

from latent_diffusion_jax.core import pixels
from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.data import degradation, image_conditioning_data, segmentation
from latent_diffusion_jax.data.inpaint_masks import MaskSettings, random_masks
from latent_diffusion_jax.models import build
from latent_diffusion_jax.models import image_conditioning as ic
from latent_diffusion_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian


@dataclasses.dataclass(frozen=True)
class ImageConditionTask:
  """What the step needs to build the conditions (static, hashable)."""
  conditioning: ic.ImageConditioning
  masks: Optional[MaskSettings] = None
  noise_level_range: Tuple[int, int] = (0, 0)


def from_config(config: mc.ConfigDict, vae: Any) -> Optional[ImageConditionTask]:
  """The run's ImageConditionTask (None without image conditioning), checked against the first
  stage and the data.

  Raises:
    UserInputError: data other than the shapes data, a low-res factor that is not the first
      stage's or does not divide the image size, fewer semantic classes than the data has.
  """
  cond = build.image_conditioning(config.model)
  if cond is None:
    return None
  build.image_conditioning_fields(config.model)  # the UNet width check, before any data
  if config.data.kind != "shapes":
    raise UserInputError(f"model.image_conditioning.kind={cond.kind!r} trains on the shapes "
                         f"data (data.kind='shapes'), not {config.data.kind!r}.")
  f = vae.downsample_factor
  settings = config.model.image_conditioning
  if cond.kind == "inpainting":
    return ImageConditionTask(cond, masks=MaskSettings.from_config(settings.mask))
  if cond.kind == "upscaling":
    factor = image_conditioning_data.low_res_factor(config)
    degradation.check_factor(config.model.image_size, factor)
    if factor != f:
      raise UserInputError(
          f"model.image_conditioning.low_res_factor={factor}, but the low-res image is "
          f"concatenated to the latents, which are the first stage's factor {f} smaller than the "
          f"image: set it to {f} (or 0).")
    if settings.degradation not in degradation.METHODS:
      raise UserInputError(f"Unknown model.image_conditioning.degradation "
                           f"{settings.degradation!r}; valid: {', '.join(degradation.METHODS)}.")
    low, high = (int(v) for v in settings.noise_level_range)
    return ImageConditionTask(cond, noise_level_range=(low, high))
  needed = segmentation.num_classes(settings.segmentation)
  if cond.num_classes < needed:
    raise UserInputError(
        f"model.image_conditioning.num_classes={cond.num_classes}, but the shapes segmentation "
        f"maps of model.image_conditioning.segmentation={settings.segmentation!r} hold class ids "
        f"up to {needed - 1}: set it to at least {needed}.")
  return ImageConditionTask(cond)


def _encode(vae: Any, vae_params: Any, images: jnp.ndarray, rng: jax.Array) -> jnp.ndarray:
  """Unscaled latents of images in [-1, 1]: a posterior sample (KL) or the pre-quantization
  latents (VQ), as the sampler encodes its inputs."""
  out = vae.apply({"params": vae_params}, images.astype(vae.dtype), method=vae.encode)
  if isinstance(vae, AutoencoderKL):
    post = DiagonalGaussian(out.astype(jnp.float32))
    out = post.mean + post.std * jax.random.normal(rng, post.mean.shape, jnp.float32)
  return out.astype(jnp.float32)


def condition_channels(task: ImageConditionTask, vae: Any, vae_params: Any,
                       batch: Dict[str, jnp.ndarray], scale_factor: jnp.ndarray, rng: jax.Array
                       ) -> Tuple[jnp.ndarray, Optional[jnp.ndarray]]:
  """(channels [B, h, w, C] to concatenate after z_t, class labels [B] or None)."""
  cond = task.conditioning
  f = vae.downsample_factor
  if cond.kind == "inpainting":
    r_mask, r_enc = jax.random.split(rng)
    images = pixels.to_float(batch["images"])
    b, h, w, _ = images.shape
    mask = random_masks(r_mask, b, (h, w), task.masks)
    masked = _encode(vae, vae_params, ic.masked_image(images, mask), r_enc) * scale_factor
    extra = jnp.concatenate([ic.mask_at_latent_size(mask, f), masked], axis=-1)
    return jax.lax.stop_gradient(extra), None
  if cond.kind == "upscaling":
    r_level, r_noise = jax.random.split(rng)
    low_res = pixels.to_float(batch["low_res"])
    b = low_res.shape[0]
    low, high = task.noise_level_range
    level = jax.random.randint(r_level, (b,), low, high + 1)
    noise = jax.random.normal(r_noise, low_res.shape, jnp.float32)
    return ic.noise_low_res(cond, low_res, noise, level), level
  labels = batch["segmentation"].astype(jnp.int32)
  return ic.semantic_map_channels(labels, cond.num_classes, f), None
