"""Image-conditioned sampling: image-to-image, inpainting, super-resolution, semantic map -> image.

  images = image_to_image(bundle, ["a red circle"], init, strength=0.6)        # SDEdit
  images = inpaint(bundle, ["a blue square"], init, mask)                       # 1 = repaint
  images = upscale(bundle, ["a red circle"], low_res, noise_level=20)           # x4 upscaler layout
  images = semantic_to_image(bundle, [""], label_maps)                          # class ids [N, H, W]

Each is one jitted computation per model, settings and batch shape (like `generation`'s
text-to-image function): text encoding, first-stage encoding of the input images, the whole
denoising loop and decoding. What the computation does follows the diffusers pipelines, so that
the same weights, latents and noise give the same pixels:

  image_to_image  StableDiffusionImg2ImgPipeline: the init image's latents (a posterior sample)
                  noised to the first timestep kept by `strength`, then the remaining steps.
  inpaint         StableDiffusionInpaintPipeline. An inpainting model (UNet input = latent +
                  mask + masked-image latents, 9 channels for SD) sees the mask and masked image
                  at every step; any text-to-image model inpaints by re-noising: after every step
                  the region outside the mask is replaced by the image's latents noised to the
                  current timestep (`samplers.renoise_known_region`). strength 1 starts from pure
                  noise; below 1, from the image's latents noised as in image_to_image.
  upscale         StableDiffusionUpscalePipeline: the low-res image (the latent's size) noised to
                  `noise_level` by the model's low-res schedule, concatenated to the latents, and
                  the level passed as the UNet's class label.
  semantic_to_image  a model with concatenated segmentation-map channels
                  (`models.image_conditioning.semantic_map_channels`).

Randomness: image i uses `fold_in(PRNGKey(seed), i)` as in text-to-image sampling (the same
initial latents and sampler keys), and further keys from it for the first-stage posterior
samples and the low-res noise. `noise` replaces any of them with given arrays (to compare with
other implementations).

Images come as uint8 [N, H, W, 3] or float [N, H, W, 3] in [0, 1]; masks as [N, H, W] or
[N, H, W, 1] (uint8 or float in [0, 1]; >= 0.5 means repaint); results are as
`generation.generate` returns them.
"""

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from latent_diffusion_jax.core import parallel, pixels
from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.diffusion import samplers, schedules
from latent_diffusion_jax.models import image_conditioning as ic
from latent_diffusion_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian
from latent_diffusion_jax.models.bundle import ModelBundle, decode_latents
import latent_diffusion_jax.sampling.generation as generation

MODES = ("img2img", "inpaint", "inpaint_renoise", "upscale", "semantic")
# The random inputs of one image, by name: their shapes follow the mode (see `_noise_shapes`).
NOISE_NAMES = ("latents", "image", "masked_image", "low_res")


@dataclasses.dataclass(frozen=True)
class _Settings:
  mode: str
  sampler: str
  num_steps: int
  guidance_scale: float
  eta: float
  prediction_type: str
  scheduler: tuple
  start_step: int
  dynamic_threshold: Optional[float]
  sample_max_value: float


class _Inputs(NamedTuple):
  """Per-image inputs (batch-major arrays; None where the mode has none)."""
  image: Any  # float [B, H, W, 3] in [-1, 1]
  mask: Any  # float [B, H, W, 1] in [0, 1]
  low_res: Any  # float [B, h, w, 3] in [-1, 1]
  noise_level: Any  # int32 [B]
  labels: Any  # int32 [B, H, W]


def mode_for(bundle: ModelBundle, *, init_image: bool = False, mask: bool = False,
             low_res: bool = False, semantic_map: bool = False) -> str:
  """The sampling mode for the given inputs and model, or a UserInputError naming what is wrong.

  Raises:
    UserInputError: inputs that do not go together, or a model without the input channels
      the inputs need (or with extra channels the inputs do not fill).
  """
  cond = bundle.image_conditioning
  latent_c, in_c = bundle.latent_channels, bundle.unet.in_channels
  ic.check_channels(cond, in_c, latent_c)
  kind = cond.kind if cond is not None else None
  if low_res:
    if init_image or mask or semantic_map:
      raise UserInputError("low_res_image goes alone: it cannot be combined with init_image, "
                           "mask_image or a semantic map.")
    if kind != "upscaling":
      raise UserInputError(f"low_res_image needs an upscaling model (UNet input = latent + 3 "
                           f"channels, low-res noise schedule); this model's UNet takes {in_c} "
                           f"channels with a {latent_c}-channel latent and {_describe(cond)}.")
    return "upscale"
  if semantic_map:
    if init_image or mask:
      raise UserInputError("A semantic map cannot be combined with init_image or mask_image.")
    if kind != "semantic":
      raise UserInputError(f"semantic_map needs a model with concatenated segmentation-map "
                           f"channels; this model has {_describe(cond)}.")
    return "semantic"
  if mask:
    if not init_image:
      raise UserInputError("mask_image needs init_image (the image to inpaint).")
    if kind == "inpainting":
      return "inpaint"
    if kind is None:
      return "inpaint_renoise"
    raise UserInputError(f"mask_image needs an inpainting or a text-to-image model; this model "
                         f"has {_describe(cond)}.")
  if init_image:
    if kind is not None:
      raise UserInputError(f"init_image alone (image-to-image) needs a model without image "
                           f"conditioning; this model has {_describe(cond)}: give "
                           f"{_NEEDS[kind]}.")
    return "img2img"
  raise UserInputError("Give init_image (with mask_image to inpaint), low_res_image or a "
                       "semantic map; for text-to-image use sampling.generate.")


_NEEDS = {"inpainting": "mask_image too", "upscaling": "low_res_image",
          "semantic": "a semantic map"}


def _describe(cond: Optional[ic.ImageConditioning]) -> str:
  return "no image conditioning" if cond is None else f"{cond.kind} conditioning"


def _encode(vae: Any, vae_params: Any, images: jnp.ndarray, eps: jnp.ndarray,
            scaling_factor: float) -> jnp.ndarray:
  """Images in [-1, 1] -> UNet-space latents: a posterior sample mean + std * eps (KL), the
  pre-quantization latents (VQ), times the scaling factor."""
  out = vae.apply({"params": vae_params}, images.astype(vae.dtype), method=vae.encode)
  if isinstance(vae, AutoencoderKL):
    post = DiagonalGaussian(out.astype(jnp.float32))
    out = post.mean + post.std * eps
  return scaling_factor * out.astype(jnp.float32)


@functools.lru_cache(maxsize=16)
def _cached_fn(model: generation._Model, s: _Settings, conditioning: Any):
  schedule = model.diffusion.noise_schedule()
  guided = s.guidance_scale > 1
  stochastic = s.sampler == "ddpm" or s.eta != 0
  unet, vae = model.unet, model.vae
  f = vae.downsample_factor
  sched = dict(s.scheduler)
  ts = samplers.sampler_timesteps(schedule.num_timesteps, s.sampler, s.num_steps,
                                  sched.get("timestep_spacing"), sched.get("steps_offset", 0))
  t_start = int(ts[s.start_step])

  def text(params, ids):
    return model.text_encoder.apply({"params": params.text_encoder}, ids).context

  def denoise(params, ctx_c, ctx_u, x, rng, hook):
    def model_fn(x_in, t, ctx):
      context, labels, extra = ctx
      if extra is not None:
        x_in = jnp.concatenate([x_in, extra.astype(x_in.dtype)], axis=-1)
      return unet.apply({"params": params.unet}, x_in, t, context, labels)

    if guided:
      denoise_fn = samplers.classifier_free_guidance(model_fn, ctx_c, ctx_u, s.guidance_scale)
    else:
      denoise_fn = lambda x_t, t: model_fn(x_t, t, ctx_c)  # noqa: E731
    hook_fn = None if hook is None else samplers.renoise_known_region(schedule, *hook)
    return samplers.sample(denoise_fn, schedule, x, rng, sampler=s.sampler,
                           num_steps=s.num_steps, eta=s.eta, prediction_type=s.prediction_type,
                           start_step=s.start_step, step_hook=hook_fn,
                           dynamic_threshold_percentile=s.dynamic_threshold,
                           sample_max_value=s.sample_max_value, **sched)

  def sample_fn(params, cond_ids, uncond_ids, inputs: _Inputs, noise: dict, rng):
    params = generation.SampleParams(*params)
    encode = functools.partial(_encode, vae, params.vae, scaling_factor=model.scaling_factor)
    x = noise["latents"].astype(jnp.float32)
    b = x.shape[0]
    labels = extra = hook = None
    if s.mode in ("img2img", "inpaint", "inpaint_renoise"):
      needs_image_latents = s.mode != "inpaint" or s.start_step > 0
      z0 = encode(inputs.image, noise["image"]) if needs_image_latents else None
      # diffusers' inpainting starts from pure noise at strength 1; img2img always mixes in
      # the image (add_noise at the first timestep).
      if s.mode == "img2img" or s.start_step > 0:
        x = schedules.add_noise(schedule, z0, x, jnp.full((b,), t_start, jnp.int32))
    if s.mode in ("inpaint", "inpaint_renoise"):
      mask = ic.binarize_mask(inputs.mask)
      mask_latent = ic.mask_at_latent_size(mask, f)
      if s.mode == "inpaint":
        masked = encode(ic.masked_image(inputs.image, mask), noise["masked_image"])
        extra = jnp.concatenate([mask_latent, masked], axis=-1)
      else:
        hook = (z0, 1.0 - mask_latent, noise["latents"].astype(jnp.float32))
    elif s.mode == "upscale":
      extra = ic.noise_low_res(conditioning, inputs.low_res, noise["low_res"], inputs.noise_level)
      labels = inputs.noise_level
    elif s.mode == "semantic":
      extra = ic.semantic_map_channels(inputs.labels, conditioning.num_classes, f)

    if model.text_encoder is not None:
      context_c = text(params, cond_ids)
      context_u = text(params, uncond_ids) if guided else None
    else:
      context_c = jnp.zeros((b, 1, unet.cross_attention_dim), unet.dtype)
      context_u = context_c
    ctx_c = (context_c, labels, extra)
    ctx_u = (context_u, labels, extra) if guided else None
    if stochastic:
      one = lambda c1, u1, x1, k1, h1: denoise(  # noqa: E731
          params, _add_batch(c1), _add_batch(u1), x1[None], k1, _add_batch(h1))[0]
      latents = jax.vmap(one)(ctx_c, ctx_u, x, rng, hook)
    else:
      latents = denoise(params, ctx_c, ctx_u, x, None, hook)
    images = decode_latents(vae, params.vae, latents / model.scaling_factor)
    return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)

  return jax.jit(sample_fn)


def _add_batch(tree):
  return jax.tree.map(lambda a: a[None], tree)


def _unit_images(images: Any, name: str, channels: int = 3) -> np.ndarray:
  """uint8 or [0, 1] float images [N, H, W, C] -> float32 [-1, 1], checked."""
  arr = np.asarray(images)
  if arr.ndim == 3 and channels == 3:
    arr = arr[None]
  if arr.ndim != 4 or arr.shape[-1] != channels:
    raise UserInputError(f"{name} must be [N, H, W, {channels}] images, got shape {arr.shape}.")
  if arr.dtype == np.uint8:
    return arr.astype(np.float32) / 127.5 - 1.0
  arr = arr.astype(np.float32)
  if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
    raise UserInputError(f"{name} must be uint8 or float in [0, 1]; got values in "
                         f"[{arr.min():.3g}, {arr.max():.3g}].")
  return arr * 2.0 - 1.0


def _mask(mask: Any, n: int, size: tuple) -> np.ndarray:
  """A mask [N, H, W] or [N, H, W, 1] (uint8 or [0, 1]) -> float32 [N, H, W, 1] in [0, 1]."""
  arr = np.asarray(mask)
  if arr.ndim == 2:
    arr = arr[None]
  if arr.ndim == 3:
    arr = arr[..., None]
  if arr.ndim != 4 or arr.shape[-1] != 1:
    raise UserInputError(f"mask_image must be single-channel ([N, H, W] or [N, H, W, 1]; 1 = "
                         f"repaint), got shape {np.asarray(mask).shape}.")
  arr = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
  if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
    raise UserInputError(f"mask_image must be uint8 or float in [0, 1]; got values in "
                         f"[{arr.min():.3g}, {arr.max():.3g}].")
  return _rows(arr, n, "mask_image", size)


def _rows(arr: np.ndarray, n: int, name: str, size: Optional[tuple] = None) -> np.ndarray:
  """One row per image: a single row is repeated; sizes are checked."""
  if arr.shape[0] == 1 and n > 1:
    arr = np.repeat(arr, n, axis=0)
  if arr.shape[0] != n:
    raise UserInputError(f"Got {arr.shape[0]} {name} rows for {n} prompts; pass one or one per "
                         "prompt.")
  if size is not None and tuple(arr.shape[1:3]) != tuple(size):
    raise UserInputError(f"{name} is {arr.shape[1]}x{arr.shape[2]} pixels but the image is "
                         f"{size[0]}x{size[1]}; they must be the same size.")
  return arr


def _check_image_size(size: tuple, name: str, factor: int, why: str) -> None:
  """Each side a positive multiple of `factor` pixels (one coarsest UNet cell)."""
  for side in size:
    if side < 1 or side % factor:
      raise UserInputError(
          f"{name} is {size[0]}x{size[1]} pixels; this model needs sides that are multiples of "
          f"{factor} ({why}), e.g. {max(factor, side // factor * factor)}.")


def _noise_shapes(mode: str, latent: tuple, low_res: Optional[tuple]) -> dict:
  shapes = {"latents": latent}
  if mode in ("img2img", "inpaint", "inpaint_renoise"):
    shapes["image"] = latent
  if mode == "inpaint":
    shapes["masked_image"] = latent
  if mode == "upscale":
    shapes["low_res"] = low_res
  return shapes


@functools.partial(jax.jit, static_argnames=("shapes",))
def _seeded_noise(seed: int, indices: jnp.ndarray, shapes: tuple) -> tuple:
  """(noise dict, sampler keys): "latents" and the keys as `generation.image_noise` draws
  them; the other inputs from `fold_in(image key, 1 + position in NOISE_NAMES)`."""
  def one(i):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
    latent_key, sampler_key = jax.random.split(key)
    out = {}
    for name, shape in shapes:
      k = latent_key if name == "latents" else jax.random.fold_in(key, 1 + NOISE_NAMES.index(name))
      out[name] = jax.random.normal(k, shape, jnp.float32)
    return out, sampler_key

  return jax.vmap(one)(indices)


def _host_noise(seed, indices, shapes: dict) -> tuple:
  try:
    device = jax.local_devices(backend="cpu")[0]
  except RuntimeError:
    device = jax.local_devices()[0]
  with jax.default_device(device):
    noise, keys = _seeded_noise(seed, jnp.asarray(indices, jnp.int32),
                                tuple(sorted(shapes.items())))
  return {k: np.asarray(v) for k, v in noise.items()}, np.asarray(keys)


def generate_from_images(
    bundle: ModelBundle, prompts: Sequence[str], *, init_image: Any = None, mask_image: Any = None,
    strength: float = 1.0, low_res_image: Any = None, noise_level: int = 20,
    semantic_map: Any = None, keep_unmasked: bool = False, negative_prompt: Any = "",
    seed: int = 0, num_steps: int = 50,
    guidance_scale: float = 7.5, sampler: str = "ddim", eta: float = 0.0,
    batch_size: Optional[int] = None, mesh=None, noise: Optional[Mapping[str, np.ndarray]] = None,
    output_type: str = "uint8", dynamic_threshold: Optional[float] = None,
    sample_max_value: float = 1.0, params: Optional[generation.SampleParams] = None,
    progress_fn: Optional[generation.ProgressFn] = None, first_index: int = 0) -> np.ndarray:
  """Samples one image per prompt, conditioned on images (the mode follows from the inputs).

  Args:
    bundle: the model (see `mode_for` for which inputs each kind of model takes).
    prompts: one text per image ("" for text-free models).
    init_image: images to start from (image-to-image) or to inpaint: [N or 1, H, W, 3].
    mask_image: with init_image, inpaint: [N or 1, H, W(, 1)], >= 0.5 (or 255) = repaint.
    strength: image-to-image / inpainting: the fraction of the denoising run that is taken,
      in (0, 1]; 1 ignores the init image's content (inpainting keeps it outside the mask).
    low_res_image: upscaling: [N or 1, h, w, 3] images; the result is f times larger.
    noise_level: upscaling: the low-res image's noise level, in [0, max_noise_level].
    semantic_map: int class ids [N or 1, H, W] (semantic models).
    keep_unmasked: inpainting: composite the result over init_image with the mask as alpha, so
      pixels outside the mask are the input's exactly (diffusers' `apply_overlay`); without it
      they are what the first stage's decoder makes of the kept latents.
    negative_prompt, seed, num_steps, guidance_scale, sampler, eta, batch_size, mesh,
      output_type, params, progress_fn, first_index: as in `generation.generate`.
    noise: replaces seeded random inputs: "latents" [N, h, w, c] (initial noise), "image" and
      "masked_image" [N, h, w, c] (standard normal noise of the first stage's posterior samples
      of the init and masked images), "low_res" [N, h, w, 3] (the low-res image's noise).
    dynamic_threshold: Imagen's dynamic thresholding percentile (e.g. 0.995); only for models
      whose x0 lies in [-1, 1] (see `diffusion.samplers`), not SD-style latents.
    sample_max_value: the largest dynamic threshold.

  Returns:
    [N, H, W, 3] images, uint8 or float32 in [0, 1] as `output_type` says.

  Raises:
    UserInputError: a bad input, named: an image or mask whose size does not fit the model or
      each other, a mask that is not single-channel, strength outside (0, 1], a noise level out
      of range, a model without the input channels the inputs need.
  """
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  n = len(prompts)
  if n == 0:
    raise UserInputError("generate_from_images needs at least one prompt.")
  if output_type not in generation.OUTPUT_TYPES:
    raise UserInputError(f"Unknown output_type {output_type!r}; valid: "
                         f"{', '.join(generation.OUTPUT_TYPES)}.")
  generation._check_sampler_args(sampler, num_steps, eta)
  mode = mode_for(bundle, init_image=init_image is not None, mask=mask_image is not None,
                  low_res=low_res_image is not None, semantic_map=semantic_map is not None)
  f = bundle.vae.downsample_factor
  total = generation.total_downsampling(bundle)
  levels = len(bundle.unet.block_out_channels)
  why = f"the first stage's factor {f} x the UNet's 2**({levels}-1)"
  inputs = dict(image=None, mask=None, low_res=None, noise_level=None, labels=None)
  low_res_shape = None
  if mode in ("img2img", "inpaint", "inpaint_renoise"):
    image = _rows(_unit_images(init_image, "init_image"), n, "init_image")
    size = image.shape[1:3]
    _check_image_size(size, "init_image", total, why)
    inputs["image"] = image
    if mode != "img2img":
      inputs["mask"] = _mask(mask_image, n, size)
  elif mode == "upscale":
    low = _rows(_unit_images(low_res_image, "low_res_image"), n, "low_res_image")
    _check_image_size(low.shape[1:3], "low_res_image", total // f,
                      f"the UNet's 2**({levels}-1): the low-res image has the latent's size")
    size = (low.shape[1] * f, low.shape[2] * f)
    low_res_shape = low.shape[1:]
    inputs["low_res"] = low
    top = bundle.image_conditioning.max_noise_level
    if isinstance(noise_level, bool) or not isinstance(noise_level, (int, np.integer)) or not (
        0 <= noise_level <= top):
      raise UserInputError(f"noise_level must be an integer in [0, {top}] (the model's "
                           f"max_noise_level), got {noise_level!r}.")
    inputs["noise_level"] = np.full((n,), noise_level, np.int32)
  else:
    labels = np.asarray(semantic_map)
    if labels.ndim == 2:
      labels = labels[None]
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
      raise UserInputError(f"semantic_map must be integer class ids [N, H, W], got "
                           f"{labels.dtype} {labels.shape}.")
    k = bundle.image_conditioning.num_classes
    if labels.size and (labels.min() < 0 or labels.max() >= k):
      raise UserInputError(f"semantic_map class ids must lie in [0, {k}), got "
                           f"[{labels.min()}, {labels.max()}].")
    labels = _rows(labels.astype(np.int32), n, "semantic_map")
    size = labels.shape[1:3]
    _check_image_size(size, "semantic_map", total, why)
    inputs["labels"] = labels
  if keep_unmasked and mode not in ("inpaint", "inpaint_renoise"):
    raise UserInputError(f"keep_unmasked is an inpainting setting (init_image and mask_image); "
                         f"got it for {mode}.")
  start_step = 0
  if mode in ("img2img", "inpaint", "inpaint_renoise"):
    start_step = samplers.start_step_for_strength(num_steps, strength)
  elif strength != 1.0:
    raise UserInputError(f"strength is an image-to-image / inpainting setting; got {strength} "
                         f"for {mode}.")

  latent = (size[0] // f, size[1] // f, bundle.latent_channels)
  shapes = _noise_shapes(mode, latent, low_res_shape)
  overrides = {}
  for name, value in (noise or {}).items():
    if name not in shapes:
      raise UserInputError(f"noise[{name!r}] is not an input of {mode}; it takes "
                           f"{sorted(shapes)}.")
    value = np.asarray(value, np.float32)
    if value.shape != (n, *shapes[name]):
      raise UserInputError(f"noise[{name!r}] must have shape {(n, *shapes[name])}, got "
                           f"{value.shape}.")
    overrides[name] = value

  guided = bundle.text_encoder is not None and guidance_scale > 1
  settings = _settings(bundle, mode, sampler, num_steps, guidance_scale if guided else 1.0, eta,
                       start_step, dynamic_threshold, sample_max_value)
  fn = _cached_fn(generation._model_key(bundle), settings, bundle.image_conditioning)
  cond, uncond = _conditioning(bundle, prompts, negative_prompt, guided)

  mesh = mesh or generation.default_mesh()
  b = generation.effective_batch_size(batch_size, n, generation._batch_shards(mesh))
  if params is None:
    params = jax.device_put(tuple(generation.bundle_params(bundle)),
                            NamedSharding(mesh, PartitionSpec()))
  num_batches = -(-n // b)
  outputs = []
  put = lambda a: None if a is None else generation._put(  # noqa: E731
      a, parallel.batch_sharding(mesh, np.ndim(a)))
  for i in range(num_batches):
    indices = np.arange(i * b, (i + 1) * b)
    rows = np.minimum(indices, n - 1)
    batch_noise, keys = _host_noise(seed, indices + first_index, shapes)
    for name, value in overrides.items():
      batch_noise[name] = value[rows]
    batch_inputs = _Inputs(**{k: None if v is None else v[rows] for k, v in inputs.items()})
    out = fn(tuple(params), put(cond[rows]), put(None if uncond is None else uncond[rows]),
             jax.tree.map(put, batch_inputs), jax.tree.map(put, batch_noise), put(keys))
    outputs.append(generation._to_host(out)[:min(b, n - i * b)])
    if progress_fn is not None:
      progress_fn(i + 1, num_batches, len(outputs[-1]))
  images = np.concatenate(outputs, axis=0)
  if keep_unmasked:
    images = composite_unmasked(np.clip(images, -1.0, 1.0), inputs["image"], inputs["mask"])
  return pixels.to_unit(images) if output_type == "float" else generation.to_uint8(images)


def composite_unmasked(generated: np.ndarray, init_image: np.ndarray, mask: np.ndarray
                       ) -> np.ndarray:
  """Inpainting results over their inputs with the mask as alpha (1 = generated), float32;
  `generated` and `init_image` [N, H, W, 3] in one range, `mask` [N, H, W(, 1)] in [0, 1]."""
  alpha = np.asarray(mask, np.float32)
  if alpha.ndim == 3:
    alpha = alpha[..., None]
  return alpha * np.asarray(generated, np.float32) + (1.0 - alpha) * np.asarray(init_image,
                                                                               np.float32)


def _settings(bundle, mode, sampler, num_steps, guidance_scale, eta, start_step,
              dynamic_threshold, sample_max_value) -> _Settings:
  scheduler = dict(generation._SD_SCHEDULER_DEFAULTS[sampler])
  scheduler.update({k: v for k, v in bundle.diffusion.scheduler_overrides().items()
                    if k != "set_alpha_to_one" or sampler == "ddim"})
  if dynamic_threshold is not None and not 0.0 < dynamic_threshold <= 1.0:
    raise UserInputError(f"dynamic_threshold must lie in (0, 1], got {dynamic_threshold}.")
  return _Settings(mode, sampler, int(num_steps), float(guidance_scale), float(eta),
                   bundle.diffusion.prediction_type, tuple(sorted(scheduler.items())),
                   int(start_step), dynamic_threshold, float(sample_max_value))


def _conditioning(bundle, prompts, negative_prompt, guided):
  """Token ids (cond, uncond) for text models; zeros for text-free ones (class labels are not
  taken here: an upscaler's class label is its noise level)."""
  if bundle.text_encoder is None:
    return np.zeros((len(prompts),), np.int32), None
  return generation._conditioning_inputs(bundle, prompts, negative_prompt, None, guided)


def image_to_image(bundle: ModelBundle, prompts: Sequence[str], init_image: Any, *,
                   strength: float = 0.8, **kwargs) -> np.ndarray:
  """SDEdit / img2img: `generate_from_images` with an init image and a strength."""
  return generate_from_images(bundle, prompts, init_image=init_image, strength=strength, **kwargs)


def inpaint(bundle: ModelBundle, prompts: Sequence[str], init_image: Any, mask_image: Any, *,
            strength: float = 1.0, **kwargs) -> np.ndarray:
  """Inpainting with an inpainting model, or with any text-to-image model by re-noising."""
  return generate_from_images(bundle, prompts, init_image=init_image, mask_image=mask_image,
                              strength=strength, **kwargs)


def upscale(bundle: ModelBundle, prompts: Sequence[str], low_res_image: Any, *,
            noise_level: int = 20, **kwargs) -> np.ndarray:
  """Super-resolution with an upscaling model (x4 upscaler layout)."""
  return generate_from_images(bundle, prompts, low_res_image=low_res_image,
                              noise_level=noise_level, **kwargs)


def semantic_to_image(bundle: ModelBundle, prompts: Sequence[str], semantic_map: Any,
                      **kwargs) -> np.ndarray:
  """Segmentation map (class ids [N, H, W]) -> image, for a semantic-conditioned model."""
  return generate_from_images(bundle, prompts, semantic_map=semantic_map, **kwargs)
