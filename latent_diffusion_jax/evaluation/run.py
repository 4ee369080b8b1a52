"""The evaluate command's work: generate (or read) images, extract features, score, report.

  result = run_evaluation(out_dir="eval/sd15", source=Source("/models/sd15"),
                          captions="captions_val2014.json", num_images=30000,
                          reference_stats="val2014_512.npz", features="inception",
                          inception_weights="weights/pt_inception.msgpack",
                          metrics=("fid", "clip"), clip="weights/ViT-H-14", ...)

Order: every input is checked (flags, captions, feature network weights, reference) before the
model is loaded; then the missing generated shards are made (`<out>/generated/`, see
generated_shards.py), then features are extracted shard by shard and the report written.
With `max_new_shards`, a run stops after making that many shards (a time-boxed job); the next
run continues from there.
"""

import time
from typing import Any, Dict, List, Optional, Sequence

from absl import logging

from latent_diffusion_jax.artifacts import loader
from latent_diffusion_jax.core.errors import FlagError, UserInputError
from latent_diffusion_jax.evaluation import image_folder, scoring
from latent_diffusion_jax.evaluation.captions import read_captions
from latent_diffusion_jax.evaluation.features import load_feature_net, stream_features
from latent_diffusion_jax.evaluation.generated_shards import ShardStore
from latent_diffusion_jax.evaluation.progress import Progress
from latent_diffusion_jax.evaluation.reference import load_reference
from latent_diffusion_jax.evaluation.report import write_report
from latent_diffusion_jax.sampling.generation import _check_sampler_args, generate


def _generate_shards(bundle, store: ShardStore, prompts: List[str], *, seed, num_steps,
                     guidance_scale, sampler, eta, batch_size, max_new_shards) -> bool:
  """Makes the missing shards; False when stopped by `max_new_shards` with shards still missing."""
  n = len(prompts)
  missing = store.missing(n)
  done_before = n - sum(stop - start for start, stop in (store.bounds(k, n) for k in missing))
  if not missing:
    logging.info("All %d generated images found in %s.", n, store.directory)
    return True
  logging.info("Generating %d images (%d shards of %d; %d images already there).",
               n - done_before, len(missing), store.shard_size, done_before)
  progress = Progress("generation", n, start=done_before)
  done = done_before
  for made, k in enumerate(missing):
    if max_new_shards is not None and made >= max_new_shards:
      logging.info("Stopping after %d new shards (max_new_shards); %d shards left.", made,
                   len(missing) - made)
      return False
    start, stop = store.bounds(k, n)
    images = generate(bundle, prompts[start:stop], seed=seed, num_steps=num_steps,
                      guidance_scale=guidance_scale, sampler=sampler, eta=eta,
                      batch_size=batch_size, first_index=start)
    store.write(k, images, prompts[start:stop])
    done += stop - start
    progress.update(done)
  return True


def run_evaluation(*, out_dir: str, source: Optional[loader.Source] = None,
                   images: Optional[str] = None, captions: Optional[str] = None,
                   num_images: Optional[int] = None, reference_images: Optional[str] = None,
                   reference_stats: Optional[str] = None, features: str = "inception",
                   inception_weights: Optional[str] = None, shapes_weights: Optional[str] = None,
                   clip: Optional[str] = None, clip_model_name: Optional[str] = None,
                   allow_pickle: bool = False, metrics: Sequence[str] = ("fid",),
                   sampler: str = "ddim", num_steps: int = 50, guidance_scale: float = 7.5,
                   eta: float = 0.0, seed: int = 0, batch_size: Optional[int] = None,
                   feature_batch_size: int = 50, shard_size: int = 1000,
                   max_new_shards: Optional[int] = None) -> Optional[Dict[str, Any]]:
  """Evaluates a model (`source`) or a folder of images (`images`); writes `<out_dir>/metrics.json`
  and `metrics.md`.

  Args:
    out_dir: the report, `generated/` shards and the cached reference statistics.
    source: the model to sample (any source of artifacts/loader.py); or
    images: a folder of images made elsewhere, scored in sorted file-name order (paired with
      `captions` in that order for the CLIP score).
    captions: a text file or COCO captions JSON (captions.py); the prompts when generating.
    num_images: images to generate (default: one per caption); with `images`, the first ones.
    reference_images, reference_stats: the real side of FID / precision-recall (exactly one).
    features: "inception" or "shapes"; inception_weights / shapes_weights their files.
    clip: a CLIP model for the CLIP score: a transformers CLIPModel directory or an open_clip
      checkpoint (evaluation/feature_nets/clip.py `load_clip`); clip_model_name the open_clip
      architecture (e.g. "ViT-H-14") when no config lies beside it; allow_pickle for .bin/.pt.
    metrics: a subset of scoring.METRICS.
    sampler, num_steps, guidance_scale, eta, seed, batch_size: as `sampling.generate`; image i
      starts from `fold_in(PRNGKey(seed), i)`.
    feature_batch_size: images per feature network call.
    shard_size: generated images per shard file.
    max_new_shards: stop after generating this many shards (None: all).

  Returns:
    {"metrics", "settings", "paths"}, or None when stopped by `max_new_shards`.
  """
  metrics = scoring.parse_metrics(metrics)
  if (source is None) == (images is None):
    raise FlagError("give either a model (--model, --checkpoint, ...) to generate images, or "
                    "--images, a folder of images to score; not both")
  needs_reference = {"fid", "precision_recall"} & set(metrics)
  if not needs_reference and (reference_images or reference_stats):
    logging.info("No FID or precision/recall asked: the reference is not used.")
  if "precision_recall" in metrics and not reference_images:
    raise FlagError("--metrics precision_recall needs the reference features: give "
                    "--reference_images (a folder), not only --reference_stats")
  if source is not None:
    _check_sampler_args(sampler, num_steps, eta)
  caption_list = None
  if captions is not None:
    caption_list = read_captions(captions, num_images if images is None else None)
  scoring.check_clip(metrics, clip, caption_list)

  # The images to score: how many, and a way to iterate over them.
  if images is not None:
    paths = image_folder.list_images(images, "images")
    if num_images is not None:
      if num_images > len(paths):
        raise UserInputError(f"--num_images {num_images} but {images} holds {len(paths)} images")
      paths = paths[:num_images]
    if caption_list is not None:
      if len(caption_list) < len(paths):
        raise UserInputError(f"{len(paths)} images in {images} but only {len(caption_list)} "
                             f"captions in {captions}")
      caption_list = caption_list[:len(paths)]
    count = len(paths)
    batches = lambda: image_folder.iter_batches(paths)  # noqa: E731
  else:
    if num_images is None:
      if caption_list is None:
        raise FlagError("give --num_images, or --captions (one image per caption)")
      num_images = len(caption_list)
    count = num_images
  scoring.check_count(metrics, count)

  net = reference = None
  if {"fid", "is", "precision_recall"} & set(metrics):
    net = load_feature_net(features, inception_weights=inception_weights,
                           shapes_weights=shapes_weights)
  if needs_reference:
    reference = load_reference(net, out_dir=out_dir, reference_images=reference_images,
                               reference_stats=reference_stats,
                               weights_path=inception_weights if features == "inception" else shapes_weights,
                               batch_size=feature_batch_size)

  settings: Dict[str, Any] = {"metrics": list(metrics), "num_images": count,
                              "features": net.name if net else None,
                              "reference": reference.origin if reference else None,
                              "captions": captions}
  if source is not None:
    bundle = loader.load_bundle(source)
    if bundle.text_encoder is not None and caption_list is None:
      raise FlagError("this model takes text: give --captions")
    prompts = caption_list or [""] * count
    gen_settings = {"source": bundle.metadata.get("source", str(source.path)),
                    "image_size": bundle.image_size, "sampler": sampler, "num_steps": num_steps,
                    "guidance_scale": guidance_scale, "eta": eta, "seed": seed}
    settings.update(gen_settings)
    store = ShardStore(f"{out_dir}/generated", gen_settings, shard_size)
    t0 = time.perf_counter()
    if not _generate_shards(bundle, store, prompts, seed=seed, num_steps=num_steps,
                            guidance_scale=guidance_scale, sampler=sampler, eta=eta,
                            batch_size=batch_size, max_new_shards=max_new_shards):
      return None
    settings["generation_seconds"] = round(time.perf_counter() - t0, 1)
    batches = lambda: store.iter_images(count, prompts)  # noqa: E731
  else:
    settings["images"] = images

  result: Dict[str, Any] = {}
  if net is not None:
    generated = stream_features(net, batches(), count, "generated", feature_batch_size)
    result.update(scoring.image_metrics(metrics, generated, reference))
  if "clip" in metrics:
    result["clip"] = scoring.clip_metric(clip, batches(), caption_list, model_name=clip_model_name,
                                         allow_pickle=allow_pickle)
  paths_written = write_report(out_dir, result, settings)
  logging.info("Metrics: %s (written to %s)", result, paths_written["json"])
  return {"metrics": result, "settings": settings, "paths": paths_written}
