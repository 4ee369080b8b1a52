"""sample.py's work: load a model from any source, sample prompts, write PNGs and settings."""

import time
from typing import Callable, Optional, Sequence

import numpy as np

from latent_diffusion_jax.artifacts import loader
import latent_diffusion_jax.sampling.conditions as conditions_lib
from latent_diffusion_jax.core import images as images_lib
import latent_diffusion_jax.sampling.controlnet as control_lib
from latent_diffusion_jax.sampling.generation import _check_sampler_args, check_size, generate
from latent_diffusion_jax.sampling.image_inputs import ImageInputs
from latent_diffusion_jax.core.errors import UserInputError


def read_prompts_file(path: str) -> list:
  """Prompts from a text file: one per line; blank lines and lines starting with '#' skipped."""
  with open(path, encoding="utf-8") as f:
    lines = [line.strip() for line in f]
  return [line for line in lines if line and not line.startswith("#")]


def run_sampling(*, prompts: Sequence[str] = (), out_dir: str, source: "loader.Source | str",
                 negative_prompt: str = "", num_images_per_prompt: int = 1, seed: int = 0,
                 num_steps: int = 50, guidance_scale: float = 7.5, sampler: str = "ddim",
                 eta: float = 0.0, batch_size: Optional[int] = None,
                 height: Optional[int] = None, width: Optional[int] = None,
                 class_labels: Optional[Sequence] = None, layouts: Optional[Sequence] = None,
                 embeddings: Optional[np.ndarray] = None, embeddings_file: Optional[str] = None,
                 controlnets: Sequence[control_lib.ControlSpec] = (), guess_mode: bool = False,
                 print_fn: Callable[[str], None] = print,
                 image_inputs: Optional[ImageInputs] = None):
  """Loads a model, samples `num_images_per_prompt` images per prompt and writes them as PNGs.

  Args:
    prompts: the prompts; each one's images are consecutive.
    out_dir: where `images.save_images` writes the PNGs, the grid and settings.json.
    source: the model: a `loader.Source` or a path (its kind detected), see artifacts/loader.py.
    negative_prompt, seed, num_steps, guidance_scale, sampler, eta, batch_size, height, width:
      see `generate` (height and width default to the model's image_size; settings.json
      records the sizes used).
    num_images_per_prompt: images per prompt (different seeds of the per-image noise).
    class_labels, layouts, embeddings: the conditions of a model with a non-text conditioner
      (indices or names; layouts as in `generate`; [n, L, D] stored embeddings), each in place
      of prompts, `num_images_per_prompt` images each.
    embeddings_file: the file `embeddings` came from, recorded in settings.json with their shape.
    controlnets: ControlNets (any source `loader.load_controlnet` reads) with their control image
      files and scales; each image must have the sampled size. settings.json records them.
    guess_mode: see `generate`.
    print_fn: progress lines go here.
    image_inputs: image files to condition on (image-to-image, inpainting, upscaling, semantic
      map; `sampling.image_conditioned`); the image size then follows from them.

  Returns:
    `images.SavedImages` with the written paths.
  """
  prompts = list(prompts)
  given = [name for name, v in (("prompts", prompts or None), ("class labels", class_labels),
                                ("layouts", layouts), ("embeddings", embeddings)) if v is not None]
  if not given:
    raise UserInputError("Nothing to sample: pass prompts (--prompt, --prompts_file), class labels "
                         "(--class_label), layouts (--layout) or --embeddings.")
  if len(given) > 1:
    raise UserInputError(f"Pass one kind of condition, got {' and '.join(given)}.")
  if num_images_per_prompt < 1:
    raise UserInputError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}.")
  # Fail on bad settings before spending time on loading the model.
  _check_sampler_args(sampler, num_steps, eta)
  conditioned = image_inputs is not None and image_inputs.given
  if conditioned and (height is not None or width is not None):
    raise UserInputError("--height/--width do not go with image inputs: the size follows from "
                         "--init_image, --low_res_image or --semantic_map.")
  if conditioned and controlnets:
    raise UserInputError("ControlNets do not go with image inputs (--init_image, --mask_image, "
                         "--low_res_image, --semantic_map) yet; use one or the other.")
  if guess_mode and not controlnets:
    raise UserInputError("guess_mode applies to ControlNets; none was given (--controlnet).")
  image_arrays = image_inputs.arrays() if conditioned else None  # bad files fail before loading
  bundle = loader.load_bundle(source)
  source = bundle.metadata["source"]
  height, width = check_size(bundle, height, width)
  controls, control_settings = [], []
  for spec in controlnets:
    net = loader.load_controlnet(spec.source, base_unet=bundle.unet)
    image = control_lib.read_control_image(spec.image, net.module.conditioning_channels)
    controls.append(control_lib.Control(net.module, net.params, image, spec.scale))
    control_settings.append(dict(source=loader.as_source(spec.source).describe(),
                                 image=spec.image, scale=spec.scale))
  k = num_images_per_prompt
  conditions = {}
  if class_labels is not None:
    conditions["class_labels"] = conditions_lib.repeat(list(class_labels), k)
    prompts = [f"class {c}" for c in class_labels]
  elif layouts is not None:
    conditions["layouts"] = conditions_lib.repeat(list(layouts), k)
    prompts = [conditions_lib.layout_caption(layout) for layout in layouts]
  elif embeddings is not None:
    conditions["conditions"] = {"embeddings": np.repeat(np.asarray(embeddings), k, axis=0)}
    prompts = [f"embedding {i}" for i in range(len(embeddings))]
  all_prompts = conditions_lib.repeat(prompts, k)
  print_fn(f"Sampling {len(all_prompts)} images of {height}x{width}px from {source} "
           f"({sampler}, {num_steps} steps, guidance {guidance_scale}"
           + (f", {len(controls)} ControlNet(s){', guess mode' if guess_mode else ''}"
              if controls else "") + ").")

  clock = {"last": time.perf_counter()}

  def progress(done: int, total: int, count: int) -> None:
    now = time.perf_counter()
    rate = count / max(now - clock["last"], 1e-9)
    clock["last"] = now
    note = " (includes compilation)" if done == 1 else ""
    print_fn(f"batch {done}/{total}: {count} images, {rate:.2f} images/s{note}")

  if conditioned:
    from latent_diffusion_jax.sampling.image_conditioned import generate_from_images
    images = generate_from_images(
        bundle, all_prompts, negative_prompt=negative_prompt, seed=seed, num_steps=num_steps,
        guidance_scale=guidance_scale, sampler=sampler, eta=eta, batch_size=batch_size,
        progress_fn=progress, **image_arrays)
    height, width = images.shape[1:3]
  else:
    images = generate(bundle, all_prompts, negative_prompt=negative_prompt, seed=seed,
                      num_steps=num_steps, guidance_scale=guidance_scale, sampler=sampler, eta=eta,
                      batch_size=batch_size, progress_fn=progress, height=height, width=width,
                      controlnets=controls, guess_mode=guess_mode, **conditions)
  settings = dict(seed=seed, sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale,
                  eta=eta, negative_prompt=negative_prompt,
                  num_images_per_prompt=num_images_per_prompt, batch_size=batch_size,
                  image_size=bundle.image_size, height=int(height), width=int(width),
                  source=source)
  if conditioned:
    settings.update(image_inputs.settings())
  if controls:
    settings.update(controlnets=control_settings, guess_mode=bool(guess_mode))
  if class_labels is not None:
    settings["class_labels"] = [c if isinstance(c, str) else int(c) for c in class_labels]
  if layouts is not None:
    settings["layouts"] = list(layouts)
  if embeddings is not None:
    settings["embeddings_shape"] = list(np.shape(embeddings))
    if embeddings_file:
      settings["embeddings_file"] = embeddings_file
  saved = images_lib.save_images(images, out_dir, all_prompts, settings)
  print_fn(f"Wrote {len(saved.images)} images, {saved.grid} and {saved.settings}.")
  return saved
