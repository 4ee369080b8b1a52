"""Batches for any training stage from `config.data`, and the held-out images stage 1 evaluates on.

By `data.kind`:
  shapes          the embedded dataset, in memory (`load_shapes_split`); with `data.pre_encode` and
                  a VAE the images are encoded once and batches carry "moments" (KL) or
                  "latents" (VQ: pre-quantization latents). Batches also carry "class_labels"
                  (data.shapes_variant="single") or "layout_boxes" / "layout_classes" ("layout").
  latent_shards   pre-encoded "moments" + "input_ids" (data/latent_shards.py); stage 2 only.
  webdataset      raw tar shards: "images" (+ "input_ids" with a tokenizer), data/webdataset.py.

Held-out images (`held_out_images`) come from the same source: the shapes test split, or for
webdataset the tar shards of `data.eval_webdataset` (stage 1 refuses a webdataset run without them).
"""

import dataclasses
import os
from typing import Any, Dict, Iterator, Optional, Tuple

import jax
import ml_collections as mc
import numpy as np

from latent_diffusion_jax.core import parallel
from latent_diffusion_jax.core.errors import UserInputError

DATA_KINDS = ("shapes", "latent_shards", "webdataset")
SHAPES_VARIANTS = ("single", "layout")


def load_shapes_split(config: mc.ConfigDict, workdir: str, tokenizer, split: str
                      ) -> Dict[str, np.ndarray]:
  """A split of the embedded dataset, generated into `data.data_dir` (default `<workdir>/tfds`) on
  first use: {"images", "class_labels"} for `data.shapes_variant` "single", {"images",
  "layout_boxes", "layout_classes"} for "layout"; plus "input_ids" when a tokenizer is given
  (without position words with `data.drop_position_words`) and the `data.control` hint when set."""
  from latent_diffusion_jax.data import shapes_source
  from latent_diffusion_jax.data.tokenizers import tokenize
  data_dir = config.data.data_dir or os.path.join(workdir, "tfds")
  variant = config.data.get("shapes_variant", "single")
  sizes = dict(num_train=config.data.num_train, num_test=config.data.num_test,
               image_size=config.model.image_size, seed=config.seed)
  if variant == "single":
    arrays = shapes_source.load_split(data_dir, split, **sizes)
    out = {"images": arrays["images"], "class_labels": arrays["class_labels"]}
  elif variant == "layout":
    arrays = shapes_source.load_layout_split(
        data_dir, split, max_boxes=config.model.conditioner.layout.max_boxes, **sizes)
    out = {k: arrays[k] for k in ("images", "layout_boxes", "layout_classes")}
  else:
    raise UserInputError(f"Unknown data.shapes_variant {variant!r}; valid: {', '.join(SHAPES_VARIANTS)}.")
  captions = list(arrays["captions"])
  if config.data.get("control") or config.data.get("drop_position_words"):
    from latent_diffusion_jax.data import control
    if config.data.control:
      out["control"] = control.control_hint(
          arrays["images"], config.data.control, config.model.controlnet.conditioning_channels)
    if config.data.drop_position_words:
      captions = control.drop_position(captions)
  if tokenizer is not None:
    out["input_ids"] = tokenize(tokenizer, captions, config.model.text_encoder.max_length)
  out.update(_image_conditioning_fields(config, arrays))
  return out


def _image_conditioning_fields(config: mc.ConfigDict, arrays) -> Dict[str, np.ndarray]:
  """"low_res" / "segmentation" for an image-conditioned run (data/image_conditioning_data.py)."""
  from latent_diffusion_jax.data import image_conditioning_data
  return image_conditioning_data.shapes_fields(config, arrays)


def make_batches(config: mc.ConfigDict, workdir: str, global_batch: int, mesh, *, tokenizer=None,
                 vae=None, vae_params=None, log_indices: bool = False
                 ) -> Tuple[Any, Iterator[Dict[str, jax.Array]]]:
  """(resumable iterator over this process's data, generator of global batches on `mesh`).

  Args:
    config: the run config (`data.kind` picks the source).
    workdir: the run's directory (shapes data and the pre-encoded latents cache live there by default).
    global_batch: examples per step over all processes.
    mesh: the device mesh the global batches are split over (data axes).
    tokenizer: adds caption token ids ("input_ids"); None for image-only stages.
    vae, vae_params: the frozen first stage of stage 2 (None in stage 1): shapes images are
      encoded once with it when `data.pre_encode`; latent shards are checked against it.
    log_indices: the shapes iterator writes `$LDJ_DATA_INDEX_LOG` (data/array_iterator.py).

  Returns:
    The iterator (its get_state/set_state is the checkpointed data position) and the global batches.
  """
  kind = config.data.kind
  if kind == "shapes":
    from latent_diffusion_jax.data.array_iterator import ArrayIterator, index_log_path
    arrays = load_shapes_split(config, workdir, tokenizer, "train")
    if config.data.pre_encode and vae is not None:
      from latent_diffusion_jax.data.pre_encode import batch_field, encode_images
      from latent_diffusion_jax.data.image_conditioning_data import keeps_images
      images = arrays["images"] if keeps_images(config) else arrays.pop("images")
      arrays[batch_field(vae)] = encode_images(vae, vae_params, images,
                                        cache_dir=os.path.join(workdir, "latents"))
    it = ArrayIterator(arrays, global_batch, seed=config.seed, process_index=jax.process_index(),
                       process_count=jax.process_count(),
                       index_log=index_log_path(jax.process_index()) if log_indices else None)
  elif kind == "latent_shards":
    if vae is None:
      raise UserInputError("data.kind='latent_shards' holds latents; training the autoencoder needs "
                           "images (data.kind='webdataset').")
    from latent_diffusion_jax.data import latent_shards
    it = latent_shards.training_reader(config, global_batch, tokenizer=tokenizer,
                                       vae_params=vae_params)
  elif kind == "webdataset":
    from latent_diffusion_jax.data import webdataset
    it = webdataset.training_reader(config, global_batch, tokenizer=tokenizer)
  else:
    raise UserInputError(f"Unknown data.kind {kind!r}; valid: {', '.join(DATA_KINDS)}.")

  def gen():
    for local in it:
      yield parallel.global_batch(local, mesh)

  return it, gen()


def check_held_out(config: mc.ConfigDict) -> None:
  """Refuses, before any training, a source that has no held-out images for stage 1."""
  if config.data.kind == "webdataset" and not config.data.eval_webdataset:
    raise UserInputError(
        "Stage 1 on data.kind='webdataset' evaluates (PSNR, SSIM) and estimates the latent scale "
        "factor on held-out images: set data.eval_webdataset to tar shards that are not in "
        "data.webdataset (a path, glob or brace pattern).")
  if config.data.kind not in ("shapes", "webdataset"):
    raise UserInputError(f"data.kind={config.data.kind!r} has no images for stage 1; use shapes "
                         "or webdataset.")


def held_out_images(config: mc.ConfigDict, workdir: str) -> np.ndarray:
  """uint8 [N, S, S, 3] held-out images of the configured source, the same on every process.

  shapes: the test split (`data.num_test` images). webdataset: the first `data.num_test` kept
  samples of `data.eval_webdataset` in reading order, cropped like the training images.
  """
  check_held_out(config)
  if config.data.kind == "shapes":
    return load_shapes_split(config, workdir, None, "test")["images"]
  from latent_diffusion_jax.data import webdataset
  from latent_diffusion_jax.data.shard_reading import expand_patterns
  files = expand_patterns(config.data.eval_webdataset)
  prep = dataclasses.replace(webdataset.Preprocessing.from_config(config),
                             resolution=config.model.image_size, require_caption=False,
                             buckets=())
  ds = webdataset.read_samples(files, prep, parallel_shards=config.encode.parallel_shards)
  ds = ds.filter(lambda r: r["status"] == "").take(config.data.num_test)
  images = [r["pixels"] for r in ds.as_numpy_iterator()]
  if not images:
    raise UserInputError(f"data.eval_webdataset={config.data.eval_webdataset!r} holds no usable "
                         "image (every sample skipped, or no shard readable).")
  return np.stack(images)
