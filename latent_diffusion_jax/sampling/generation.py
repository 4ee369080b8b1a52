"""Text-to-image sampling: token ids to pixels as one jitted computation, batched over a mesh.

  bundle = load_pipeline("/models/sd15")
  images = generate(bundle, ["a photo of a cat"], seed=0, num_steps=30)  # uint8 [1, 512, 512, 3]

Text encoding, the whole denoising loop (classifier-free guidance as one UNet call on a doubled
batch), latent unscaling and the VAE decoder are one `jax.jit`, compiled once per model,
settings and batch shape and reused across batches and calls (`make_sample_fn` caches it).
A VQ first stage decodes through its quantizer (`models.bundle.decode_latents`): the UNet denoises
pre-quantization latents, which are snapped to the codebook before the decoder.

Reproducibility: image i starts from noise drawn with `fold_in(PRNGKey(seed), i)`, so it is the
same image whatever the batch size or device count.

Size: `height` and `width` (default: the bundle's square image_size) may be any multiple of the
model's total downsampling, the first stage's factor times the UNet's 2**(levels-1) (e.g. a model
trained on aspect-ratio buckets sampled at one of them); each size compiles once.
"""

import dataclasses
import functools
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import jax.numpy as jnp
import numpy as np

from latent_diffusion_jax.core import parallel, pixels
from latent_diffusion_jax.diffusion import samplers
from latent_diffusion_jax.diffusion.spec import DiffusionSpec
from latent_diffusion_jax.models.bundle import ModelBundle, decode_latents
from latent_diffusion_jax.core.errors import UserInputError
import latent_diffusion_jax.sampling.controlnet as control_lib
import latent_diffusion_jax.sampling.placed_params as placed_params

SAMPLERS = samplers.SAMPLERS
OUTPUT_TYPES = ("uint8", "float")
# Default images per batch shard when batch_size is not given: keeps a 512px SD batch (doubled
# by guidance) well inside one accelerator's memory while amortizing the per-step overhead.
_DEFAULT_IMAGES_PER_SHARD = 4
# The Stable Diffusion scheduler settings (scheduler_config.json of SD 1.x/2.x) where they
# differ from the diffusers constructor defaults that `samplers.sample` uses.
_SD_SCHEDULER_DEFAULTS = {
    "ddim": dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False),
    "ddpm": dict(timestep_spacing="leading", steps_offset=1),
    "dpmpp_2m": dict(timestep_spacing="linspace", steps_offset=1),
}


class SampleParams(NamedTuple):
  """The parameters a sample function takes: one tree per network (None where a model has
  none), and one per ControlNet of the sample function, in order."""
  unet: Any
  vae: Any
  text_encoder: Any
  conditioner: Any = None
  controlnets: tuple = ()


def bundle_params(bundle: ModelBundle) -> SampleParams:
  """The parameter trees of `bundle`, in the form `make_sample_fn` functions take."""
  return SampleParams(bundle.unet_params, bundle.vae_params, bundle.text_encoder_params,
                      bundle.conditioner_params)


@dataclasses.dataclass(frozen=True)
class _Model:
  """The static (hashable) part of a bundle: modules and settings, no parameters."""
  unet: Any
  vae: Any
  text_encoder: Any
  scaling_factor: float
  diffusion: DiffusionSpec
  conditioner: Any = None
  controlnets: tuple = ()


@dataclasses.dataclass(frozen=True)
class _Settings:
  sampler: str
  num_steps: int
  guidance_scale: float
  eta: float
  prediction_type: str
  scheduler: tuple
  guess_mode: bool = False


class SampleFn:
  """A jitted `(params, cond, uncond, latents_T, rng[, control]) -> images` that counts its traces.

  Args of the call:
    params: `SampleParams` (or the equivalent tuple).
    cond: int32 token ids [B, L] for text models; the conditioner's fields {name: [B, ...]} for
      models with a conditioner (models/conditioners/); int32 class labels [B] for
      class-conditional UNets without one; for unconditional models any [B] array (unused).
    uncond: like `cond`, the negative / empty prompt ids or the conditioner's null input;
      ignored (pass None) without guidance.
    latents_T: float32 initial noise [B, h, w, c] in UNet units (scaled latents).
    rng: per-image PRNG keys [B, 2] (uint32), used by stochastic samplers (DDPM, DDIM eta > 0).
    control: with ControlNets, (one control image batch [B, H, W, C] per ControlNet, float32
      scales [K]); None without.

  Returns:
    float32 images [B, H, W, 3] in [-1, 1].
  """

  def __init__(self, fn: Callable[..., jnp.ndarray], guided: bool):
    self.guided = guided
    self.num_traces = 0

    def counted(*args):
      self.num_traces += 1
      return fn(*args)

    self._jitted = jax.jit(counted)

  def __call__(self, params, cond, uncond, latents_T, rng, control=None) -> jnp.ndarray:
    return self._jitted(tuple(params), cond, uncond if self.guided else None, latents_T, rng,
                        control)

  def lower(self, params, cond, uncond, latents_T, rng, control=None):
    """Ahead-of-time lowering, e.g. `.lower(...).compile().memory_analysis()`."""
    return self._jitted.lower(tuple(params), cond, uncond if self.guided else None, latents_T, rng,
                              control)


def _check_sampler_args(sampler: str, num_steps: int, eta: float) -> None:
  if sampler not in SAMPLERS:
    raise UserInputError(f"Unknown sampler {sampler!r}; valid samplers are {', '.join(SAMPLERS)}.")
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise UserInputError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
  if sampler != "ddim" and eta != 0:
    raise UserInputError(f"eta is a DDIM option; sampler {sampler!r} needs eta=0, got {eta}.")


def _check_supported(bundle: ModelBundle) -> None:
  unet = bundle.unet
  if unet.in_channels != bundle.latent_channels:
    raise UserInputError(
        f"The UNet takes {unet.in_channels} input channels but the VAE latent has "
        f"{bundle.latent_channels}: image-conditioned models (inpainting, upscaling) are not "
        "supported by text-to-image sampling; sample them with "
        "sampling.image_conditioned.generate_from_images (sample.py --init_image/--mask_image, "
        "--low_res_image or --semantic_map).")
  if bundle.text_encoder is not None and unet.num_class_embeds is not None:
    raise UserInputError("Models conditioned on both text and class labels are not supported.")
  if bundle.conditioner is not None and bundle.conditioner.context_width != unet.cross_attention_dim:
    raise UserInputError(f"The {bundle.conditioner.kind!r} conditioner's context width "
                         f"{bundle.conditioner.context_width} is not the UNet's cross_attention_dim "
                         f"{unet.cross_attention_dim}.")


def _model_key(bundle: ModelBundle, controlnets: tuple = ()) -> _Model:
  return _Model(bundle.unet, bundle.vae, bundle.text_encoder, float(bundle.scaling_factor),
                bundle.diffusion, bundle.conditioner, tuple(controlnets))


def _is_guided(bundle: ModelBundle, guidance_scale: float) -> bool:
  # Guidance needs a null condition: the empty prompt, or a conditioner's null input. A UNet
  # with only its own class embedding (no conditioner) has none.
  return (bundle.text_encoder is not None or bundle.conditioner is not None) and guidance_scale > 1


def make_sample_fn(bundle: ModelBundle, *, sampler: str = "ddim", num_steps: int = 50,
                   guidance_scale: float = 7.5, eta: float = 0.0, controlnets: Sequence[Any] = (),
                   guess_mode: bool = False) -> SampleFn:
  """The jitted sampling function for `bundle` and these settings (built once, then cached).

  Scheduler details follow Stable Diffusion's scheduler configs (DDIM/DDPM: "leading" timesteps,
  steps_offset=1, set_alpha_to_one=False; DPM-Solver++ 2M: "linspace"), unless
  `bundle.diffusion` holds `timestep_spacing`, `steps_offset` or `set_alpha_to_one`.

  Args:
    bundle: the model; only its modules and settings are baked in, parameters are arguments.
    sampler: one of SAMPLERS.
    num_steps: denoising steps (UNet evaluations), >= 1.
    guidance_scale: classifier-free guidance weight; <= 1 (or a text-free model) runs the
      conditional model alone, at half the cost.
    eta: DDIM noise level (0 = deterministic DDIM).
    controlnets: ControlNet modules (models/controlnet.py) whose residuals drive the UNet; their
      params go in `SampleParams.controlnets`, their images and scales in the call's `control`.
    guess_mode: ControlNets see the conditional half of a guided batch only (sampling/controlnet.py).

  Returns:
    A `SampleFn`; equal models and settings give the same object, so its compiled executables
    are shared by all callers.

  Raises:
    ValueError: for an unknown sampler, num_steps < 1, eta with a non-DDIM sampler, or a model
      this pipeline cannot sample.
  """
  _check_sampler_args(sampler, num_steps, eta)
  _check_supported(bundle)
  guided = _is_guided(bundle, guidance_scale)
  scheduler = dict(_SD_SCHEDULER_DEFAULTS[sampler])
  scheduler.update({k: v for k, v in bundle.diffusion.scheduler_overrides().items()
                    if k != "set_alpha_to_one" or sampler == "ddim"})
  settings = _Settings(sampler, int(num_steps), float(guidance_scale) if guided else 1.0,
                       float(eta), bundle.diffusion.prediction_type,
                       tuple(sorted(scheduler.items())), bool(guess_mode) and bool(controlnets))
  return _cached_sample_fn(_model_key(bundle, controlnets), settings)


@functools.lru_cache(maxsize=16)
def _cached_sample_fn(model: _Model, s: _Settings) -> SampleFn:
  schedule = model.diffusion.noise_schedule()
  guided = s.guidance_scale > 1
  # Ancestral noise is drawn per image (vmap over per-image keys) so that an image does not
  # depend on which other images share its batch.
  stochastic = s.sampler == "ddpm" or s.eta != 0
  unet = model.unet

  def conditioning(params: SampleParams, cond):
    """(context [B, L, D], class labels [B] or None) for the UNet."""
    if model.conditioner is not None:
      out = model.conditioner.encode(params.conditioner, cond)
      return out.context.astype(unet.dtype), (out.class_labels if unet.num_class_embeds else None)
    if model.text_encoder is not None:
      out = model.text_encoder.apply({"params": params.text_encoder}, cond)
      return out.context, None
    # Text-free UNets may still have cross-attention layers; an all-zero context of length 1
    # is what they were trained with in place of text.
    context = jnp.zeros((cond.shape[0], 1, unet.cross_attention_dim), unet.dtype)
    return context, (cond if unet.num_class_embeds is not None else None)

  def denoise(params: SampleParams, c, uc, x_T, rng, control):
    def model_fn(x, t, ctx):
      extra = ()
      if model.controlnets:
        extra = (True, *control_lib.residuals(model.controlnets, params.controlnets, *control,
                                              x, t, ctx[0], ctx[1], guided=guided,
                                              guess_mode=s.guess_mode))
      return unet.apply({"params": params.unet}, x, t, ctx[0], ctx[1], *extra)

    if guided:
      # ControlNet residuals are computed for both halves in one call (sampling/controlnet.py).
      denoise_fn = samplers.classifier_free_guidance(
          model_fn, c, uc, s.guidance_scale,
          separate_passes=False if model.controlnets else None)
    else:
      denoise_fn = lambda x, t: model_fn(x, t, c)  # noqa: E731
    return samplers.sample(denoise_fn, schedule, x_T, rng, sampler=s.sampler,
                           num_steps=s.num_steps, eta=s.eta, prediction_type=s.prediction_type,
                           **dict(s.scheduler))

  def sample_fn(params, cond, uncond, latents_T, rng, control):
    params = SampleParams(*params)
    c = conditioning(params, cond)
    uc = conditioning(params, uncond) if guided else None
    images, scales = control if control is not None else ((), None)
    if stochastic:
      add_batch = functools.partial(jax.tree.map, lambda a: a[None])
      one = lambda c1, uc1, x1, k1, i1: denoise(  # noqa: E731
          params, add_batch(c1), add_batch(uc1), x1[None], k1, (add_batch(i1), scales))[0]
      latents = jax.vmap(one)(c, uc, latents_T, rng, images)
    else:
      latents = denoise(params, c, uc, latents_T, None, (images, scales))
    images = decode_latents(model.vae, params.vae, latents / model.scaling_factor)
    return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)

  return SampleFn(sample_fn, guided)


def total_downsampling(bundle: ModelBundle) -> int:
  """Pixels per latent-grid cell at the UNet's coarsest level: the first stage's downsampling
  factor times the UNet's 2**(levels-1). Sampled sides must be multiples of it."""
  return bundle.vae.downsample_factor * 2 ** (len(bundle.unet.block_out_channels) - 1)


def check_size(bundle: ModelBundle, height: Optional[int], width: Optional[int]) -> tuple:
  """(height, width) in pixels to sample: the given sides (None: `bundle.image_size`), validated.

  Raises:
    UserInputError: a side that is not a positive multiple of `total_downsampling(bundle)`.
  """
  size = (bundle.image_size if height is None else height,
          bundle.image_size if width is None else width)
  if height is None and width is None:
    return size
  f, total = bundle.vae.downsample_factor, total_downsampling(bundle)
  for name, side in zip(("height", "width"), size):
    if isinstance(side, bool) or not isinstance(side, (int, np.integer)) or side < 1 or side % total:
      raise UserInputError(
          f"{name}={side} is not a positive multiple of {total}: the model's total downsampling "
          f"(first stage factor {f} x UNet 2**({len(bundle.unet.block_out_channels)}-1) = "
          f"{total // f}); e.g. {max(total, (int(side) // total) * total)} or "
          f"{(int(side) // total + 1) * total}.")
  return int(size[0]), int(size[1])


def latent_shape(bundle: ModelBundle, height: Optional[int] = None,
                 width: Optional[int] = None) -> tuple:
  """(h, w, c) of the UNet's latents for `height` x `width` pixels (default: the square
  `bundle.image_size`)."""
  height, width = check_size(bundle, height, width)
  f = bundle.vae.downsample_factor
  return (height // f, width // f, bundle.unet.in_channels)


@functools.partial(jax.jit, static_argnames=("shape",))
def image_noise(seed: int, indices: jnp.ndarray, shape: tuple) -> tuple:
  """Initial latents and sampler keys of images `indices`, from `fold_in(PRNGKey(seed), i)`.

  Args:
    seed: the generation seed.
    indices: int [B] image indices.
    shape: (h, w, c) of one latent (`latent_shape(bundle)`).

  Returns:
    (float32 latents [B, *shape], uint32 keys [B, 2] for stochastic samplers).
  """
  def one(i):
    latent_key, sampler_key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), i))
    return jax.random.normal(latent_key, shape, jnp.float32), sampler_key

  return jax.vmap(one)(indices)


def _host_noise(seed: int, indices: np.ndarray, shape: tuple) -> tuple:
  """`image_noise` computed on the CPU backend, as host arrays.

  The accelerator is busy with the previous batch, so noise made there would only arrive after
  it; the CPU also gives the same noise bits whatever accelerator samples.
  """
  try:
    device = jax.local_devices(backend="cpu")[0]
  except RuntimeError:  # no CPU backend in this process (JAX_PLATFORMS excludes it)
    device = jax.local_devices()[0]
  with jax.default_device(device):
    latents, keys = image_noise(seed, jnp.asarray(indices, jnp.int32), shape)
  return np.asarray(latents), np.asarray(keys)


def _conditioning_inputs(bundle: ModelBundle, prompts: Sequence[str], negative_prompt,
                         class_labels, guided: bool, layouts=None, conditions=None):
  """Host arrays (cond [N, ...], uncond [N, ...] or None) for the sample function; dicts of the
  conditioner's fields for models with a conditioner."""
  n = len(prompts)
  if bundle.conditioner is not None:
    cond = bundle.conditioner.sampling_inputs(n, class_labels=class_labels, layouts=layouts,
                                              conditions=conditions)
    return cond, (bundle.conditioner.null_inputs(n) if guided else None)
  if layouts is not None or conditions is not None:
    raise UserInputError("This model has no layout or embedding conditioner; layouts and "
                         "conditions do not apply.")
  if bundle.text_encoder is None:
    if bundle.unet.num_class_embeds is None:
      if class_labels is not None:
        raise UserInputError("This model is unconditional; it takes no class_labels.")
      return np.zeros((n,), np.int32), None
    if class_labels is None:
      raise UserInputError(f"This model is class-conditional ({bundle.unet.num_class_embeds} "
                       "classes) and has no text encoder: pass class_labels.")
    labels = np.asarray(class_labels, np.int32).reshape(-1)
    if len(labels) != n:
      raise UserInputError(f"Got {len(labels)} class_labels for {n} images.")
    if labels.min() < 0 or labels.max() >= bundle.unet.num_class_embeds:
      raise UserInputError(f"class_labels must lie in [0, {bundle.unet.num_class_embeds}), got "
                       f"{labels.tolist()}.")
    return labels, None

  if class_labels is not None:
    raise UserInputError("This is a text-to-image model; condition it with prompts, not class_labels.")
  if bundle.tokenizer_path is None:
    raise UserInputError("The model has a text encoder but the bundle names no tokenizer "
                     "(bundle.tokenizer_path is None); point it at a tokenizer directory.")
  from latent_diffusion_jax.data import tokenizers  # transformers is slow to import
  tokenizer = tokenizers.load_tokenizer(bundle.tokenizer_path)
  cond = tokenizers.tokenize(tokenizer, prompts, bundle.max_length)
  if not guided:
    return cond, None
  negatives = [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt)
  if len(negatives) != n:
    raise UserInputError(f"Got {len(negatives)} negative prompts for {n} prompts; pass one string or "
                     "one per prompt.")
  return cond, tokenizers.tokenize(tokenizer, negatives, bundle.max_length)


def default_mesh() -> Mesh:
  """All local devices on the "data" axis: pure data parallelism, parameters replicated."""
  return parallel.create_mesh({"data": -1}, devices=jax.local_devices())


def _batch_shards(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in parallel.BATCH_AXES if a in mesh.shape]))


def effective_batch_size(batch_size: Optional[int], num_images: int, shards: int) -> int:
  """The batch every chunk is padded to: a multiple of `shards`, never more than needed.

  One batch shape for all chunks means one compilation; a last chunk that is short is padded.
  """
  if batch_size is not None and batch_size < 1:
    raise UserInputError(f"batch_size must be >= 1, got {batch_size}.")
  wanted = batch_size or _DEFAULT_IMAGES_PER_SHARD * shards
  b = min(wanted, num_images)
  return -(-b // shards) * shards


def _put(x: Optional[np.ndarray], sharding: NamedSharding):
  # Every process holds the whole host batch, so each device can take its slice directly;
  # this also works on meshes that span processes.
  if x is None:
    return None
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] float images -> uint8 [0, 255], rounded as diffusers' numpy_to_pil does."""
  return pixels.to_uint8(images)


ProgressFn = Callable[[int, int, int], None]


def generate(bundle: ModelBundle, prompts: Sequence[str], *, negative_prompt: str | Sequence[str] = "",
             seed: int = 0, num_steps: int = 50, guidance_scale: float = 7.5,
             sampler: str = "ddim", eta: float = 0.0, batch_size: Optional[int] = None,
             mesh: Optional[Mesh] = None, initial_latents: Optional[np.ndarray] = None,
             class_labels: Optional[Sequence[int]] = None, output_type: str = "uint8",
             progress_fn: Optional[ProgressFn] = None,
             params: Optional[SampleParams] = None, height: Optional[int] = None,
             width: Optional[int] = None, first_index: int = 0,
             layouts: Optional[Sequence] = None,
             conditions: Optional[Dict[str, np.ndarray]] = None,
             controlnets: Sequence[control_lib.Control] = (),
             guess_mode: bool = False) -> np.ndarray:
  """Samples one image per prompt.

  Args:
    bundle: the model.
    prompts: one text per image. For text-free models only their number matters (use "").
    negative_prompt: the unconditional text of classifier-free guidance (replacing the empty
      prompt); one string for all images or one per prompt.
    seed: image i starts from `fold_in(PRNGKey(seed), i)`, whatever the batching.
    num_steps: denoising steps.
    guidance_scale: classifier-free guidance weight; <= 1 disables guidance. Text-free models are
      sampled without guidance.
    sampler: one of SAMPLERS ("ddpm", "ddim", "dpmpp_2m").
    eta: DDIM noise (0 = deterministic).
    batch_size: images per device call, rounded up to a multiple of the mesh's batch shards;
      default 4 per shard. The last batch is padded and the padding dropped.
    mesh: devices to split each batch over (dims "data" x "fsdp"); default all local devices.
      Parameters are replicated on it, unless `params` are given; that copy is kept for the next
      call with the same bundle, parameter trees and mesh (sampling/placed_params.py).
    initial_latents: optional float [N, h, w, c] noise in UNet units, replacing the seeded noise
      (for comparisons with other implementations).
    class_labels: a class per image (index, or name when the model has class names), for
      class-conditional models.
    layouts: one layout per image for layout-to-image models: a list of (box, class) or
      {"box": [x0, y0, x1, y1], "class": index or name} objects, optionally wrapped as
      {"objects": [...]}; boxes are fractions of the image in [0, 1]
      (models/conditioners/layout.py).
    conditions: the conditioner's batch fields {name: [N, ...]} directly, e.g.
      {"embeddings": [N, L, D]} for a model on precomputed embeddings, or a user conditioner's.
    output_type: "uint8" ([0, 255]) or "float" (float32 in [0, 1], before rounding).
    progress_fn: called as progress_fn(batches_done, num_batches, images_in_batch) after each
      batch's images reach the host.
    params: `SampleParams` already placed on `mesh` (e.g. a train state's sharded params), used
      as they are instead of the bundle's, which are then not read; no host copy is made. With
      ControlNets, their params come from its `controlnets` field when set (e.g. a ControlNet
      train state's), else from the `Control`s.
    height, width: image size in pixels, each a multiple of `total_downsampling(bundle)`
      (default: `bundle.image_size`).
    first_index: the index of the first prompt's image: prompt k starts from
      `fold_in(PRNGKey(seed), first_index + k)`, so a long list sampled in parts (evaluation
      shards) gives the images of one call.
    controlnets: `sampling.controlnet.Control`s (ControlNet, params, control image, scale) whose
      summed residuals drive the UNet, as diffusers' StableDiffusionControlNetPipeline (with a
      MultiControlNetModel for several) does; with guidance on both halves of the batch.
    guess_mode: with guidance, the ControlNets see only the prompt half, their residuals ramped
      from 0.1 to 1 (diffusers' guess_mode; guidance 3-5 suits it).

  Returns:
    [N, H, W, 3] images, uint8 or float32 as `output_type` says.

  Raises:
    ValueError: unknown sampler, num_steps < 1, a prompt too long for `bundle.max_length` or with
      unknown words, no tokenizer for a text model, mismatched labels / latents.
  """
  if isinstance(prompts, str):
    prompts = [prompts]
  prompts = list(prompts)
  n = len(prompts)
  if n == 0:
    raise UserInputError("generate needs at least one prompt.")
  if output_type not in OUTPUT_TYPES:
    raise UserInputError(f"Unknown output_type {output_type!r}; valid: {', '.join(OUTPUT_TYPES)}.")
  shape = latent_shape(bundle, height, width)  # bad sizes fail before anything compiles
  controls = list(controlnets)
  control_images, control_scales = control_lib.prepare(
      controls, bundle.unet, n, *check_size(bundle, height, width), bundle.vae.downsample_factor)
  sample_fn = make_sample_fn(bundle, sampler=sampler, num_steps=num_steps,
                             guidance_scale=guidance_scale, eta=eta,
                             controlnets=tuple(c.controlnet for c in controls),
                             guess_mode=guess_mode)
  if not sample_fn.guided and guidance_scale > 1:
    logging.info("A model without a null condition: sampling without classifier-free guidance.")
  cond, uncond = _conditioning_inputs(bundle, prompts, negative_prompt, class_labels,
                                      sample_fn.guided, layouts, conditions)
  if initial_latents is not None:
    initial_latents = np.asarray(initial_latents, np.float32)
    if initial_latents.shape != (n, *shape):
      raise UserInputError(f"initial_latents must have shape {(n, *shape)}, got "
                       f"{initial_latents.shape}.")

  mesh = mesh or default_mesh()
  b = effective_batch_size(batch_size, n, _batch_shards(mesh))
  if batch_size is not None and b != min(batch_size, n):
    logging.info("Batch size %d padded to %d, a multiple of the mesh's batch shards.",
                 batch_size, b)
  replicated = NamedSharding(mesh, PartitionSpec())
  if params is None:
    params = placed_params.placed(bundle, tuple(bundle_params(bundle)), mesh)
  if controls and not SampleParams(*params).controlnets:
    params = SampleParams(*params)._replace(controlnets=jax.device_put(
        tuple(c.params for c in controls), replicated))
  control_scales = jax.device_put(control_scales, replicated) if controls else None

  num_batches = -(-n // b)
  outputs, pending = [], None

  def collect(out, valid, index):
    outputs.append(_to_host(out)[:valid])
    if progress_fn is not None:
      progress_fn(index + 1, num_batches, valid)

  for i in range(num_batches):
    indices = np.arange(i * b, (i + 1) * b)
    rows = np.minimum(indices, n - 1)  # padding repeats the last image; dropped below
    latents, keys = _host_noise(seed, indices + first_index, shape)
    if initial_latents is not None:
      latents = initial_latents[rows]
    take = functools.partial(jax.tree.map, lambda a: np.asarray(a)[rows])
    args = [take(cond), None if uncond is None else take(uncond), latents, keys]
    args = [jax.tree.map(lambda a: _put(a, parallel.batch_sharding(mesh, np.ndim(a))), a)
            if a is not None else None for a in args]
    control = None
    if controls:
      control = (tuple(_put(image[rows], parallel.batch_sharding(mesh, 4))
                       for image in control_images), control_scales)
    out = sample_fn(params, *args, control)  # asynchronous: the next batch is dispatched before this one is read
    if pending is not None:
      collect(*pending)
    pending = (out, min(b, n - i * b), i)
  collect(*pending)

  images = np.concatenate(outputs, axis=0)
  if output_type == "float":
    return pixels.to_unit(images)
  return to_uint8(images)
