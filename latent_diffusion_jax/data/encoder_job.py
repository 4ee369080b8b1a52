"""The sharded encode job: WebDataset tar shards in, latent shards (latent_shards.py) out.

  python -m latent_diffusion_jax.cli.encode --config configs/sd15.py \
      --input 'gs://bucket/laion/{00000..00127}.tar' --output gs://bucket/laion-latents-512

Each host takes the input shards i with i % process_count == process_index and writes one output
shard per input shard. Images are encoded by the VAE and captions by the frozen text encoder in
large jitted batches split over the host's local devices; the host's tf.data pipeline decodes the
next images meanwhile, and results are written one batch behind, so the devices rarely wait.

Resumable: an output shard is written under a temporary name and renamed when complete (after its
NAME.stats.json), so a restarted job skips exactly the finished shards. `encode_job.json` records
the models' fingerprints and the preprocessing; a restart with different ones is refused. The
host that finds every shard finished writes manifest.json.

With aspect-ratio buckets (`data.buckets`, data/buckets.py) each image is cropped to its nearest
bucket and every input shard NAME.tar gives one output shard per bucket, NAME.b{k}.tfrecord (k the
bucket's index; empty ones too), so a shard holds one latent shape; the manifest lists each
bucket's size and latent shape under "buckets" and each shard's bucket under "shards". An input
shard counts as finished when all its bucket shards exist. Records wait in one buffer per bucket;
when an input shard has ended, the buffers holding its records are encoded at once (padded), so
shards finish as they are read rather than at the end of the job.
"""

import dataclasses
import math
import posixpath
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from latent_diffusion_jax.core import parallel, pixels
from latent_diffusion_jax.data import buckets as buckets_lib
from latent_diffusion_jax.data import latent_shards as ls
from latent_diffusion_jax.data import webdataset as wds
from latent_diffusion_jax.data.pre_encode import fingerprint
from latent_diffusion_jax.data.shard_reading import expand_patterns
from latent_diffusion_jax.models.autoencoder import DiagonalGaussian
from latent_diffusion_jax.models.build import first_stage_kind
from latent_diffusion_jax.core.errors import InputFileError, UserInputError

_SKIPPED_KEYS_KEPT = 20  # per reason, in each shard's stats file


class BatchEncoder:
  """Jitted VAE (+ optional text) encoding of fixed-size batches over this host's devices.

  Stores what stage 2 trains on: a KL model's posterior moments ("moments"), or a VQ model's
  deterministic pre-quantization latents ("latents"; `field` says which).

  Args:
    vae, vae_params: the frozen first stage (its `dtype` is the compute dtype).
    text_encoder, text_params: a frozen text encoder to store embeddings of, or None.
    batch_size: images per call; rounded up to a multiple of the local device count.
    storage_dtype: "float16" or "bfloat16" for the stored moments or latents.
    devices: devices to split batches over; default this host's.
  """

  def __init__(self, vae, vae_params, text_encoder=None, text_params=None, *, batch_size: int,
               storage_dtype: str = "float16", devices: Optional[Sequence[jax.Device]] = None):
    if storage_dtype not in ("float16", "bfloat16"):
      raise UserInputError(f"storage dtype {storage_dtype!r}; valid: float16, bfloat16.")
    self.mesh = parallel.create_mesh((-1, 1, 1), devices=list(devices or jax.local_devices()))
    self.batch_size = math.ceil(batch_size / self.mesh.size) * self.mesh.size
    self.storage_dtype = storage_dtype
    self.first_stage = first_stage_kind(vae)
    self.field = ls.FIELDS[self.first_stage]
    self.vae_fingerprint = fingerprint(vae_params)
    self.text_fingerprint = fingerprint(text_params) if text_params is not None else None
    replicated = NamedSharding(self.mesh, PartitionSpec())
    self._params = jax.device_put({"vae": vae_params, "text": text_params}, replicated)
    store = jnp.dtype(storage_dtype)

    def encode(params, images, input_ids):
      x = pixels.to_float(images)
      encoded = vae.apply({"params": params["vae"]}, x, method=vae.encode).astype(jnp.float32)
      # Per-example sums of E[z] and E[z^2] for the manifest's 1/std scale estimate.
      axes = tuple(range(1, encoded.ndim))
      if self.first_stage == "vq":  # deterministic: z itself
        sums = jnp.stack([encoded.sum(axes), (encoded**2).sum(axes)], -1)
      else:
        posterior = DiagonalGaussian(encoded)
        sums = jnp.stack([posterior.mean.sum(axes),
                          (posterior.mean**2 + jnp.exp(posterior.logvar)).sum(axes)], -1)
      out = {self.field: encoded.astype(store), "latent_sums": sums}
      if params["text"] is not None:
        hidden = text_encoder.apply({"params": params["text"]}, input_ids)
        out["context"] = hidden.context.astype(jnp.float16)
      return out

    self._encode = jax.jit(encode)

  def __call__(self, images: np.ndarray, input_ids: np.ndarray) -> Dict[str, jax.Array]:
    """Dispatches one batch (exactly `batch_size` rows) and returns without waiting."""
    data = lambda x: jax.device_put(x, parallel.batch_sharding(self.mesh, x.ndim))
    return self._encode(self._params, data(images), data(input_ids))

  def output_shapes(self, resolution: int, max_length: int,
                    width: Optional[int] = None) -> Dict[str, tuple]:
    """Per-example shapes of the outputs for `resolution` (height) x `width` (default: the same)
    images, traced without running anything."""
    width = resolution if width is None else width
    out = jax.eval_shape(self._encode, self._params,
                         jax.ShapeDtypeStruct((1, resolution, width, 3), jnp.uint8),
                         jax.ShapeDtypeStruct((1, max_length), jnp.int32))
    return {k: tuple(v.shape[1:]) for k, v in out.items()}


@dataclasses.dataclass
class _Shard:
  """Counts and the open writer of one shard being encoded."""
  stats: Dict[str, Any]
  # By bucket index; -1 without buckets.
  writers: Dict[int, ls.ShardWriter] = dataclasses.field(default_factory=dict)
  ended: bool = False
  pending: int = 0  # kept records not yet written


def _new_stats(path: str, name: str) -> Dict[str, Any]:
  return {"input": path, "output": name, "read": 0, "kept": 0, "skipped": {}, "skipped_keys": {},
          "captions_truncated": 0, "latent_sums": [0.0, 0.0, 0]}


def plan_inputs(inputs: str | Sequence[str]) -> Tuple[List[str], List[str]]:
  """(input shard paths, output shard names); fails fast on bad patterns or clashing names."""
  files = expand_patterns(inputs)
  return files, output_names(files)


def output_names(files: Sequence[str]) -> List[str]:
  """`NAME.tfrecord` per input `NAME.tar` (or .tar.gz / .tgz); refuses clashing names."""
  names = []
  for path in files:
    base = posixpath.basename(path)
    for suffix in (".tar.gz", ".tgz", ".tar"):
      if base.endswith(suffix):
        base = base[:-len(suffix)]
        break
    names.append(base + ls.SHARD_SUFFIX)
  clashes = sorted({n for n in names if names.count(n) > 1})
  if clashes:
    raise UserInputError(f"Input shards from different directories share names {clashes[:5]}; encode "
                     "them into separate output directories.")
  return names


def bucket_output_name(name: str, bucket: int) -> str:
  """`NAME.b{bucket}.tfrecord`: bucket `bucket`'s output shard of the input shard whose unbucketed
  output would be `name` (NAME.tfrecord)."""
  return f"{name[:-len(ls.SHARD_SUFFIX)]}.b{bucket}{ls.SHARD_SUFFIX}"


def shard_outputs(name: str, prep: wds.Preprocessing) -> List[str]:
  """The output shards an input shard writes: `name` alone, or one per bucket."""
  if not prep.buckets:
    return [name]
  return [bucket_output_name(name, k) for k in range(len(prep.buckets))]


def _job_description(config, prep: wds.Preprocessing, encoder: BatchEncoder, tokenizer) -> dict:
  max_length = config.model.text_encoder.max_length
  shapes = encoder.output_shapes(*((prep.buckets[0][0], max_length, prep.buckets[0][1])
                                   if prep.buckets else (prep.resolution, max_length)))
  job = {
      "format": ls.FORMAT, "vae_fingerprint": encoder.vae_fingerprint,
      "text_encoder_fingerprint": encoder.text_fingerprint,
      "tokenizer_fingerprint": ls.tokenizer_fingerprint(tokenizer),
      "preprocessing": prep.describe(), "storage_dtype": encoder.storage_dtype,
      "compute_dtype": config.model.dtype, f"{encoder.field}_shape": list(shapes[encoder.field]),
      "max_length": max_length,
      "context_shape": list(shapes["context"]) if "context" in shapes else None,
  }
  if prep.buckets:  # one stored shape per bucket instead of one for all
    del job[f"{encoder.field}_shape"]
    job["buckets"] = [
        {"size": [h, w], f"{encoder.field}_shape":
         list(encoder.output_shapes(h, max_length, width=w)[encoder.field])}
        for h, w in prep.buckets]
  # Stored conditions (encode.class_field / embedding_field); absent keys keep older jobs resumable.
  if prep.class_field:
    job["class_field"] = prep.class_field
  if prep.embedding_field:
    job["embeddings_shape"] = list(prep.embedding_shape)
  # KL jobs keep the keys of the jobs written before VQ support, so those resume unchanged.
  if encoder.first_stage != "kl":
    job["first_stage"] = encoder.first_stage
  return job


def _check_job(output_dir: str, job: dict, process_index: int) -> None:
  path = posixpath.join(output_dir, ls.JOB_FILE)
  if tf.io.gfile.exists(path):
    previous = ls.read_json(path)
    changed = sorted(k for k in set(job) | set(previous) if job.get(k) != previous.get(k))
    if changed:
      raise UserInputError(f"{output_dir} holds shards encoded with other settings ({changed} differ: "
                       f"{[(previous.get(k), job.get(k)) for k in changed]}); use another "
                       "--output.")
    return
  ls.write_json(path, job, tmp_suffix=f".tmp{process_index}")


class _Progress:
  """Log lines with images/s every `every_s` seconds."""

  def __init__(self, total_shards: int, every_s: float):
    self.total_shards, self.every_s = total_shards, every_s
    self.t0 = self.last = time.perf_counter()
    self.encoded = self.read = self.shards_done = 0

  def maybe_log(self, force: bool = False) -> None:
    now = time.perf_counter()
    if force or now - self.last >= self.every_s:
      self.last = now
      logging.info("Encode: %d/%d shards, %d records read, %d images encoded (%.1f images/s)",
                   self.shards_done, self.total_shards, self.read, self.encoded,
                   self.encoded / max(now - self.t0, 1e-9))


class _ShardEncoder:
  """Routes records to per-shard writers, batching kept ones through the encoder."""

  def __init__(self, config, encoder: BatchEncoder, tokenizer, output_dir: str, files, names,
               todo: Sequence[int], after_shard: Optional[Callable[[str], None]]):
    self.config, self.encoder, self.tokenizer = config, encoder, tokenizer
    self.output_dir, self.after_shard = output_dir, after_shard
    self.max_length = config.model.text_encoder.max_length
    self.prep = wds.Preprocessing.from_config(config)
    self.buckets = self.prep.buckets
    # Indexed like the records' "shard" field: position in `todo`.
    self.shards = [_Shard(_new_stats(files[i], names[i])) for i in todo]
    # Kept records waiting for a full batch, by bucket (-1 without buckets).
    self.buffers: Dict[int, List[dict]] = {}
    self.inflight = None
    self.progress = _Progress(len(todo), config.encode.log_every_seconds)

  def add_chunk(self, chunk: Dict[str, np.ndarray]) -> None:
    statuses = chunk["status"].copy()
    kept = np.flatnonzero(statuses == b"")
    captions = [chunk["caption"][j].decode("utf-8") for j in kept]
    ids, too_long = wds.tokenize_captions(self.tokenizer, captions, self.max_length)
    if self.config.encode.long_captions == "skip":
      statuses[kept[too_long]] = b"caption_too_long"
    token_rows = dict(zip(kept, zip(ids, too_long, captions)))
    for j, status in enumerate(statuses):
      shard = self.shards[chunk["shard"][j]]
      key = chunk["key"][j].decode("utf-8", "replace")
      if status == wds.SHARD_END.encode():
        shard.ended = True
        continue
      shard.stats["read"] += 1
      self.progress.read += 1
      if status:
        self._skip(shard, key, status.decode(), chunk["detail"][j].decode("utf-8", "replace"))
        continue
      row_ids, truncated, caption = token_rows[j]
      shard.stats["captions_truncated"] += int(truncated)
      shard.pending += 1
      bucket, pixels = -1, chunk["pixels"][j]
      if self.buckets:  # the crop sits at the top left of the padded canvas
        bucket = int(chunk["bucket"][j])
        height, width = self.buckets[bucket]
        pixels = pixels[:height, :width]
      self.buffers.setdefault(bucket, []).append({
          "shard": shard, "key": key, "caption": caption, "pixels": pixels, "input_ids": row_ids,
          "original_size": chunk["original_size"][j], "crop_offset": chunk["crop_offset"][j],
          "class_label": int(chunk["class_label"][j]), "embedding": chunk["embedding"][j]})
    for bucket, buffer in self.buffers.items():
      while len(buffer) >= self.encoder.batch_size:
        self._dispatch(bucket, self.encoder.batch_size)
        buffer = self.buffers[bucket]
    if self.buckets:
      self._flush_ended()
    self._finish_ended()
    self.progress.maybe_log()

  def _flush_ended(self) -> None:
    """Encodes the buffers holding records of ended shards, so those shards can finish now."""
    waiting = {id(s) for s in self.shards if s.ended and s.pending}
    for bucket, buffer in self.buffers.items():
      if any(id(r["shard"]) in waiting for r in buffer):
        while self.buffers[bucket]:
          self._dispatch(bucket, min(len(self.buffers[bucket]), self.encoder.batch_size))
    if waiting:
      self._drain()

  def finish(self) -> None:
    for bucket in self.buffers:
      while self.buffers[bucket]:
        self._dispatch(bucket, min(len(self.buffers[bucket]), self.encoder.batch_size))
    self._drain()
    for shard in self.shards:
      shard.ended = True
    self._finish_ended()
    self.progress.maybe_log(force=True)

  def _skip(self, shard: _Shard, key: str, reason: str, detail: str) -> None:
    stats = shard.stats
    stats["skipped"][reason] = stats["skipped"].get(reason, 0) + 1
    keys = stats["skipped_keys"].setdefault(reason, [])
    if len(keys) < _SKIPPED_KEYS_KEPT:
      keys.append(key)
    logging.info("Skipped %s in %s: %s%s", key, posixpath.basename(stats["input"]), reason,
                 f" ({detail})" if detail else "")

  def _dispatch(self, bucket: int, n: int) -> None:
    """Starts encoding the first `n` records buffered for `bucket`, then writes the previous batch."""
    records, self.buffers[bucket] = self.buffers[bucket][:n], self.buffers[bucket][n:]
    pad = self.encoder.batch_size - n
    images = np.stack([r["pixels"] for r in records])
    ids = np.stack([r["input_ids"] for r in records])
    if pad:  # one compiled shape for every batch
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
      ids = np.concatenate([ids, np.repeat(ids[-1:], pad, 0)])
    outputs = self.encoder(images, ids)
    self._drain()
    self.inflight = (outputs, records, bucket)

  def _drain(self) -> None:
    if self.inflight is None:
      return
    outputs, records, bucket = self.inflight
    self.inflight = None
    outputs = jax.device_get(outputs)
    contexts = outputs.get("context", [None] * len(records))
    prep = self.prep
    for i, r in enumerate(records):
      shard = r["shard"]
      writer = self._writer(shard, bucket)
      field = self.encoder.field
      embeddings = (np.frombuffer(r["embedding"], np.float16).reshape(prep.embedding_shape)
                    if prep.embedding_field else None)
      writer.write(ls.serialize_example(
          key=r["key"], caption=r["caption"], **{field: outputs[field][i]},
          input_ids=r["input_ids"], original_size=r["original_size"],
          crop_offset=r["crop_offset"], context=contexts[i],
          class_label=r["class_label"] if prep.class_field else None, embeddings=embeddings))
      sums = shard.stats["latent_sums"]
      sums[0] += float(outputs["latent_sums"][i, 0])
      sums[1] += float(outputs["latent_sums"][i, 1])
      # Latent elements: moments hold two numbers (mean, logvar) per element.
      elements = int(np.prod(outputs[field].shape[1:]))
      sums[2] += elements // 2 if field == "moments" else elements
      shard.stats["kept"] += 1
      shard.pending -= 1
    self.progress.encoded += len(records)

  def _output_name(self, shard: _Shard, bucket: int) -> str:
    name = shard.stats["output"]
    return name if bucket < 0 else bucket_output_name(name, bucket)

  def _writer(self, shard: _Shard, bucket: int) -> ls.ShardWriter:
    if bucket not in shard.writers:
      shard.writers[bucket] = ls.ShardWriter(
          posixpath.join(self.output_dir, self._output_name(shard, bucket)))
    return shard.writers[bucket]

  def _finish_ended(self) -> None:
    for shard in self.shards:
      if not shard.ended or shard.pending or shard.stats.get("done"):
        continue
      path = posixpath.join(self.output_dir, shard.stats["output"])
      if not shard.writers:
        logging.warning("Shard %s yielded no examples (%s).", shard.stats["input"],
                        shard.stats["skipped"] or "empty")
      # Empty shards (nothing kept, or nothing in a bucket) still mark the input as done.
      for bucket in range(len(self.buckets)) if self.buckets else (-1,):
        self._writer(shard, bucket)
      if self.buckets:
        shard.stats["outputs"] = {self._output_name(shard, b): {"bucket": b, "kept": w.count}
                                  for b, w in sorted(shard.writers.items())}
      shard.stats["done"] = True
      ls.write_json(path[:-len(ls.SHARD_SUFFIX)] + ls.STATS_SUFFIX, shard.stats)
      for _, writer in sorted(shard.writers.items()):
        writer.commit()
      self.progress.shards_done += 1
      if self.after_shard is not None:
        self.after_shard(shard.stats["output"])


def encode_shards(config, inputs: str | Sequence[str], output_dir: str, *, encoder: BatchEncoder,
                  tokenizer, process_index: Optional[int] = None,
                  process_count: Optional[int] = None, scale_factor: Optional[float] = None,
                  after_shard: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
  """Encodes this host's share of the input shards into `output_dir`, skipping finished ones.

  Args:
    config: the run config (encode.*, model.text_encoder.max_length, seed).
    inputs: shard pattern(s): paths, globs, brace patterns (shard_reading.expand_patterns).
    output_dir: local or gs:// directory for the latent shards.
    encoder: the models (see `BatchEncoder`; `training.frozen.build_encoder` makes one from the config).
    tokenizer: the CLIP tokenizer of the caption ids.
    process_index, process_count: this host's share; default: JAX's.
    scale_factor: the VAE's latent scale factor when known (recorded in the manifest).
    after_shard: called with each finished output shard's name (tests use it to interrupt).

  Returns:
    {"read", "kept", "skipped": {reason: n}, "captions_truncated", "shards", "manifest"} over this
    host's shards, including ones finished by earlier runs; "manifest" is the manifest path when
    this host wrote it.
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  files, names = plan_inputs(inputs)
  mine = [i for i in range(len(files)) if i % pc == pi]
  prep = wds.Preprocessing.from_config(config)
  if prep.buckets:
    buckets_lib.check_buckets(config)
  tf.io.gfile.makedirs(output_dir)
  job = _job_description(config, prep, encoder, tokenizer)
  _check_job(output_dir, job, pi)
  todo = [i for i in mine if not _finished(output_dir, names[i], prep)]
  logging.info("Encoding %d of %d shards on host %d/%d (%d already done) into %s", len(todo),
               len(files), pi, pc, len(mine) - len(todo), output_dir)
  if todo:
    job_encoder = _ShardEncoder(config, encoder, tokenizer, output_dir, files, names, todo,
                                after_shard)
    ds = wds.read_samples([files[i] for i in todo], prep,
                          parallel_shards=config.encode.parallel_shards,
                          parallel_decode=config.encode.parallel_decode or tf.data.AUTOTUNE)
    ds = ds.batch(encoder.batch_size).prefetch(2)
    for chunk in ds.as_numpy_iterator():
      job_encoder.add_chunk(chunk)
    job_encoder.finish()
  summary = summarize([_stats_path(output_dir, names[i]) for i in mine])
  logging.info("Encode summary (host %d):\n%s", pi, format_table(summary))
  summary["manifest"] = maybe_write_manifest(output_dir, names, job, config, pi, scale_factor,
                                             prep=prep)
  return summary


def check_kept(summary: Dict[str, Any]) -> None:
  """Raises when this host read samples but kept none: the output would train on nothing."""
  if summary["read"] and not summary["kept"]:
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(summary["skipped"].items()))
    raise InputFileError(
        f"All {summary['read']} samples read were skipped ({reasons or 'no reason recorded'}); "
        "nothing was encoded. Check the sample members the config asks for (encode.*_field, "
        "captions) and the conditioner flags (model.conditioner.*).")


def _finished(output_dir: str, name: str, prep: wds.Preprocessing) -> bool:
  return all(tf.io.gfile.exists(posixpath.join(output_dir, n)) for n in shard_outputs(name, prep))


def _stats_path(output_dir: str, name: str) -> str:
  return posixpath.join(output_dir, name[:-len(ls.SHARD_SUFFIX)] + ls.STATS_SUFFIX)


def summarize(stats_paths: Sequence[str]) -> Dict[str, Any]:
  """Totals over shards' stats files: read, kept, skipped by reason, truncated captions."""
  total = {"read": 0, "kept": 0, "skipped": {}, "captions_truncated": 0, "shards": {},
           "latent_sums": [0.0, 0.0, 0]}
  for path in stats_paths:
    stats = ls.read_json(path)
    if "outputs" in stats:  # bucketed: one entry per bucket shard, read/skipped on the first
      for i, (name, out) in enumerate(sorted(stats["outputs"].items(), key=lambda x: x[1]["bucket"])):
        total["shards"][name] = {"input": stats["input"], "bucket": out["bucket"],
                                 "kept": out["kept"], "read": stats["read"] if i == 0 else 0,
                                 "skipped": stats["skipped"] if i == 0 else {}}
    else:
      total["shards"][stats["output"]] = {k: stats[k] for k in ("input", "read", "kept", "skipped")}
    for k in ("read", "kept", "captions_truncated"):
      total[k] += stats[k]
    for reason, n in stats["skipped"].items():
      total["skipped"][reason] = total["skipped"].get(reason, 0) + n
    total["latent_sums"] = [a + b for a, b in zip(total["latent_sums"], stats["latent_sums"])]
  return total


def format_table(summary: Dict[str, Any]) -> str:
  """The end-of-job table: records read, kept and skipped by reason."""
  rows = [("read", summary["read"]), ("kept", summary["kept"])]
  rows += [(f"skipped: {r}", n) for r, n in sorted(summary["skipped"].items())]
  rows.append(("(captions truncated, kept)", summary["captions_truncated"]))
  width = max(len(r) for r, _ in rows)
  return "\n".join(f"  {r:<{width}}  {n:>10,}" for r, n in rows)


def maybe_write_manifest(output_dir: str, names: Sequence[str], job: dict, config,
                         process_index: int, scale_factor: Optional[float],
                         prep: Optional[wds.Preprocessing] = None) -> Optional[str]:
  """Writes manifest.json when every shard of the job is finished (by any host)."""
  prep = prep or wds.Preprocessing.from_config(config)
  stats_paths = [_stats_path(output_dir, n) for n in names]
  finished = [_finished(output_dir, n, prep) for n in names]
  if not all(finished):
    logging.info("%d of %d shards still unfinished (other hosts); their host writes the manifest.",
                 finished.count(False), len(names))
    return None
  summary = summarize(stats_paths)
  s_mean, s_sq, count = summary.pop("latent_sums")
  std = math.sqrt(max(s_sq / count - (s_mean / count)**2, 0.0)) if count else None
  manifest = dict(job, num_examples=summary["kept"], num_shards=len(summary["shards"]),
                  read=summary["read"],
                  skipped=summary["skipped"], captions_truncated=summary["captions_truncated"],
                  shards=summary["shards"], latent_mean=s_mean / count if count else None,
                  latent_std=std, estimated_scale_factor=1.0 / std if std else None,
                  latent_scale_factor=scale_factor,
                  config=config.to_json_best_effort(sort_keys=True),
                  created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
  path = posixpath.join(output_dir, ls.MANIFEST)
  ls.write_json(path, manifest, tmp_suffix=f".tmp{process_index}")
  logging.info("Wrote %s: %d examples in %d shards", path, summary["kept"], len(names))
  return path
