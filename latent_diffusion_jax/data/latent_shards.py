"""Latent shards: TFRecord files of pre-encoded examples, their manifest, and the training reader.

An output directory of `python -m latent_diffusion_jax.cli.encode` holds one `NAME.tfrecord` per input
shard `NAME.tar`, a `NAME.stats.json` beside each (its counts), `encode_job.json` (the settings a
resumed job must match) and, once every shard is done, `manifest.json`.

Per example (tf.train.Example features):
  key, caption            bytes
  moments                 KL first stage: raw little-endian bytes of [h, w, 2C] in the manifest's
                          `storage_dtype` (float16 or bfloat16): channels [:C] the posterior mean,
                          [C:] its logvar
  moments_shape           int64 [3];  moments_dtype  bytes ("float16" / "bfloat16")
  latents, latents_shape, VQ first stage, instead of moments: its deterministic pre-quantization
  latents_dtype           latents [h, w, embed_dim] (encoder + quant_conv), same encoding
  input_ids               int64 [max_length], padded with the pad token
  context, context_shape  optional: float16 bytes of the frozen text encoder's output [L, D]
  original_size           int64 [2] (height, width) before resizing
  crop_offset             int64 [2] (top, left) of the crop in the resized image
  class_label             optional (encode.class_field): int64 [1], the sample's class
  embeddings,             optional (encode.embedding_field): float16 bytes of a precomputed
  embeddings_shape        embedding [L, D] of any external encoder

The manifest says which: `first_stage` "vq" with `latents_shape`, or (absent: "kl", as every
directory written before VQ support) `moments_shape`. Stored conditions show as the manifest's
`class_field` and `embeddings_shape`; the reader then yields "class_labels" and "embeddings". Batches carry the field of the same name,
which `training.diffusion_step.encode_latents` reads. A directory encoded with aspect-ratio buckets
(`data.buckets`) has instead a "buckets" list ({"size": [h, w], "moments_shape" or
"latents_shape"}) and one file per input shard and bucket; its reader is data/bucketed_shards.py.

Training reader (deterministic, exactly resumable): each host reads files[process_index::count].
Every epoch the host's files are permuted from (seed, host, epoch) and cut into windows of
`files_per_window` files; a window's files are interleaved and shuffled with a seed of its own,
then windows follow each other. The position is one integer, the number of batches consumed, the
same on every host. Since the manifest gives each file's record count, a restart computes the
window holding that position, rebuilds it and skips into it: a resume re-reads at most one
window (files_per_window files, no parsing), never the epoch so far. This beats saving tf.data's
iterator checkpoint, which would store the whole shuffle buffer (gigabytes of latents per host)
in a per-host file beside each Orbax step, and which breaks when the host count changes.
"""

import hashlib
import json
import posixpath
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from latent_diffusion_jax.data.shard_reading import ResumableBatches, expand_patterns, host_files
from latent_diffusion_jax.core.errors import UserInputError, MissingInputError

MANIFEST = "manifest.json"
JOB_FILE = "encode_job.json"
SHARD_SUFFIX = ".tfrecord"
STATS_SUFFIX = ".stats.json"
FORMAT = "latent_shards/v1"
_TF_DTYPES = {"float16": tf.float16, "bfloat16": tf.bfloat16}
# The stored field per first-stage kind (autoencoder.kind).
FIELDS = {"kl": "moments", "vq": "latents"}


def first_stage(manifest: dict) -> str:
  """The first-stage kind ("kl" or "vq") whose encodings a manifest's shards hold."""
  return manifest.get("first_stage", "kl")


def stored_field(manifest: dict) -> str:
  """The per-example field holding the encodings: "moments" (KL) or "latents" (VQ)."""
  kind = first_stage(manifest)
  if kind not in FIELDS:
    raise UserInputError(f"Latent shards of an unknown first stage {kind!r}; known: {sorted(FIELDS)}.")
  return FIELDS[kind]


def _bytes(*values: bytes) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _ints(values) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def serialize_example(*, key: str, caption: str, input_ids: np.ndarray,
                      original_size: Sequence[int], crop_offset: Sequence[int],
                      moments: Optional[np.ndarray] = None, latents: Optional[np.ndarray] = None,
                      context: Optional[np.ndarray] = None, class_label: Optional[int] = None,
                      embeddings: Optional[np.ndarray] = None) -> bytes:
  """One encoded sample as a serialized tf.train.Example (layout in the module docstring).

  Exactly one of `moments` (KL first stage) and `latents` (VQ first stage) is given.
  """
  if (moments is None) == (latents is None):
    raise UserInputError("serialize_example takes exactly one of moments (KL) and latents (VQ).")
  field, array = ("moments", moments) if moments is not None else ("latents", latents)
  features = {
      "key": _bytes(key.encode("utf-8")), "caption": _bytes(caption.encode("utf-8")),
      field: _bytes(np.ascontiguousarray(array).tobytes()),
      f"{field}_shape": _ints(array.shape), f"{field}_dtype": _bytes(array.dtype.name.encode()),
      "input_ids": _ints(input_ids), "original_size": _ints(original_size),
      "crop_offset": _ints(crop_offset),
  }
  if context is not None:
    features["context"] = _bytes(np.ascontiguousarray(context, np.float16).tobytes())
    features["context_shape"] = _ints(context.shape)
  if class_label is not None:
    features["class_label"] = _ints([class_label])
  if embeddings is not None:
    features["embeddings"] = _bytes(np.ascontiguousarray(embeddings, np.float16).tobytes())
    features["embeddings_shape"] = _ints(embeddings.shape)
  return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def parse_example(serialized: bytes) -> Dict[str, Any]:
  """Reads one example back into numpy (for tools and tests; training parses in tf.data)."""
  f = tf.train.Example.FromString(serialized).features.feature
  field = "moments" if "moments" in f else "latents"
  dtype = np.dtype(tf.as_dtype(f[f"{field}_dtype"].bytes_list.value[0].decode()).as_numpy_dtype)
  out = {
      "key": f["key"].bytes_list.value[0].decode("utf-8"),
      "caption": f["caption"].bytes_list.value[0].decode("utf-8"),
      field: np.frombuffer(f[field].bytes_list.value[0], dtype).reshape(
          f[f"{field}_shape"].int64_list.value),
      "input_ids": np.asarray(f["input_ids"].int64_list.value, np.int32),
      "original_size": tuple(f["original_size"].int64_list.value),
      "crop_offset": tuple(f["crop_offset"].int64_list.value),
  }
  if "context" in f:
    out["context"] = np.frombuffer(f["context"].bytes_list.value[0], np.float16).reshape(
        f["context_shape"].int64_list.value)
  if "class_label" in f:
    out["class_label"] = int(f["class_label"].int64_list.value[0])
  if "embeddings" in f:
    out["embeddings"] = np.frombuffer(f["embeddings"].bytes_list.value[0], np.float16).reshape(
        f["embeddings_shape"].int64_list.value)
  return out


def read_shard(path: str) -> List[Dict[str, Any]]:
  """All examples of one latent shard, in file order."""
  return [parse_example(r.numpy()) for r in tf.data.TFRecordDataset(path)]


def write_json(path: str, value: Any, tmp_suffix: str = ".tmp") -> None:
  """Writes JSON so that readers see the old file or the whole new one, never a partial one."""
  tmp = path + tmp_suffix
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(json.dumps(value, indent=2, sort_keys=True) + "\n")
  tf.io.gfile.rename(tmp, path, overwrite=True)


def read_json(path: str) -> Any:
  """Reads a JSON file from any path tf.io.gfile knows."""
  with tf.io.gfile.GFile(path, "r") as f:
    return json.loads(f.read())


class ShardWriter:
  """Writes one output shard under a temporary name; `commit` renames it into place."""

  def __init__(self, path: str):
    self.path, self.tmp_path = path, path + ".tmp"
    self._writer = tf.io.TFRecordWriter(self.tmp_path)
    self.count = 0

  def write(self, serialized: bytes) -> None:
    self._writer.write(serialized)
    self.count += 1

  def commit(self) -> None:
    self._writer.close()
    tf.io.gfile.rename(self.tmp_path, self.path, overwrite=True)


def resolve_shards(pattern: str) -> Tuple[List[str], List[int], dict]:
  """Latent shard files named by a directory or pattern, with their manifest(s).

  Returns:
    (files sorted, record count per file, the first manifest). All manifests must agree on the
    stored shapes and dtype.

  Raises:
    FileNotFoundError: no shard matches, or a directory has no manifest (its encode job is not
      finished).
    ValueError: manifests disagree, or a file is missing from its manifest.
  """
  if tf.io.gfile.isdir(pattern):
    pattern = posixpath.join(pattern, "*" + SHARD_SUFFIX)
  files = sorted(f for f in expand_patterns(pattern) if f.endswith(SHARD_SUFFIX))
  if not files:
    raise MissingInputError(f"No latent shards ({SHARD_SUFFIX}) match {pattern!r}.")
  manifests: Dict[str, dict] = {}
  counts = []
  for path in files:
    directory = posixpath.dirname(path)
    if directory not in manifests:
      manifest_path = posixpath.join(directory, MANIFEST)
      if not tf.io.gfile.exists(manifest_path):
        raise MissingInputError(f"{manifest_path} is missing: the encode job writing {directory} "
                                "has not finished (re-run it; finished shards are skipped).")
      manifests[directory] = read_json(manifest_path)
    shards = manifests[directory]["shards"]
    name = posixpath.basename(path)
    if name not in shards:
      raise UserInputError(f"{path} is not listed in {directory}/{MANIFEST}.")
    counts.append(int(shards[name]["kept"]))
  first, *others = manifests.values()
  for other in others:
    for field in ("first_stage", "storage_dtype", "moments_shape", "latents_shape", "max_length",
                  "context_shape", "vae_fingerprint", "tokenizer_fingerprint", "buckets",
                  "class_field", "embeddings_shape"):
      if other.get(field) != first.get(field):
        raise UserInputError(f"Latent shard directories disagree on {field}: {first.get(field)} vs "
                         f"{other.get(field)}.")
  return files, counts, first


def _window_plan(files: Sequence[str], counts: Sequence[int], *, seed: int, process_index: int,
                 files_per_window: int, start_example: int):
  """Yields (window files, shuffle seed, records to skip) for this host, forever."""
  files, counts = np.asarray(files), np.asarray(counts, np.int64)
  epoch, offset = divmod(start_example, int(counts.sum()))
  while True:
    order = np.random.default_rng([seed, process_index, epoch]).permutation(len(files))
    for window, start in enumerate(range(0, len(files), files_per_window)):
      chosen = order[start:start + files_per_window]
      count = int(counts[chosen].sum())
      if offset >= count:  # wholly consumed before the resume point (or empty)
        offset -= count
        continue
      window_rng = np.random.default_rng([seed, process_index, epoch, window])
      shuffle_seed = int(window_rng.integers(2**31))
      yield files[chosen].astype(bytes), np.int64(shuffle_seed), np.int64(offset)
      offset = 0
    epoch += 1


def latent_dataset(files: Sequence[str], counts: Sequence[int], *, local_batch: int, seed: int,
                   start_batch: int, storage_dtype: str, max_length: int,
                   moments_shape: Optional[Sequence[int]] = None,
                   latents_shape: Optional[Sequence[int]] = None,
                   context_shape: Optional[Sequence[int]] = None,
                   class_labels: bool = False,
                   embeddings_shape: Optional[Sequence[int]] = None,
                   with_metadata: bool = False, process_index: int = 0,
                   shuffle_buffer: int = 10_000, files_per_window: int = 16,
                   prefetch: int = 2) -> tf.data.Dataset:
  """Endless batches of this host's examples, from batch `start_batch` on (see module doc).

  Args:
    files, counts: this host's latent shards and their record counts (from the manifest).
    local_batch: examples per batch on this host (global batch / process count).
    seed: data-order seed.
    start_batch: batches already consumed (0 for a fresh run).
    storage_dtype, max_length, context_shape: the stored layout (manifest); context_shape None
      leaves text embeddings out.
    moments_shape, latents_shape: the shape of the stored encodings, exactly one given: KL
      moments or VQ latents (the manifest's `first_stage` says which).
    class_labels: also return the stored "class_labels" (int32 [B]).
    embeddings_shape: [L, D] of the stored precomputed embeddings, returned as "embeddings"
      (float32 [B, L, D]); None leaves them out.
    with_metadata: also return key, caption, original_size, crop_offset.
    process_index: this host's index (decorrelates hosts' orders).
    shuffle_buffer: examples in each window's shuffle buffer.
    files_per_window: files interleaved and shuffled together; bounds the cost of a resume.
    prefetch: batches prepared ahead.

  Returns:
    A tf.data.Dataset of dicts: moments [B, h, w, 2C] or latents [B, h, w, d] (storage dtype),
    input_ids int32 [B, max_length], optionally context float16 [B, L, D] and the metadata fields.
  """
  if (moments_shape is None) == (latents_shape is None):
    raise UserInputError("latent_dataset takes exactly one of moments_shape and latents_shape.")
  field, shape = (("moments", moments_shape) if moments_shape is not None
                  else ("latents", latents_shape))
  if not files or sum(counts) == 0:
    raise UserInputError(f"Host {process_index} has no latent examples to read ({len(files)} files).")
  plan = tf.data.Dataset.from_generator(
      lambda: _window_plan(files, counts, seed=seed, process_index=process_index,
                           files_per_window=files_per_window,
                           start_example=start_batch * local_batch),
      output_signature=(tf.TensorSpec([None], tf.string), tf.TensorSpec([], tf.int64),
                        tf.TensorSpec([], tf.int64)))

  def window(paths, shuffle_seed, skip):
    records = tf.data.Dataset.from_tensor_slices(paths).interleave(
        lambda path: tf.data.TFRecordDataset(path), cycle_length=files_per_window, block_length=1,
        num_parallel_calls=files_per_window, deterministic=True)
    return records.shuffle(shuffle_buffer, seed=shuffle_seed).skip(skip)

  spec = {field: tf.io.FixedLenFeature([], tf.string),
          "input_ids": tf.io.FixedLenFeature([max_length], tf.int64)}
  if context_shape is not None:
    spec["context"] = tf.io.FixedLenFeature([], tf.string)
  if class_labels:
    spec["class_label"] = tf.io.FixedLenFeature([1], tf.int64)
  if embeddings_shape is not None:
    spec["embeddings"] = tf.io.FixedLenFeature([], tf.string)
  if with_metadata:
    spec.update(key=tf.io.FixedLenFeature([], tf.string),
                caption=tf.io.FixedLenFeature([], tf.string),
                original_size=tf.io.FixedLenFeature([2], tf.int64),
                crop_offset=tf.io.FixedLenFeature([2], tf.int64))

  def parse(serialized):
    f = tf.io.parse_example(serialized, spec)
    out = dict(f)
    out[field] = tf.reshape(tf.io.decode_raw(f[field], _TF_DTYPES[storage_dtype]), [-1, *shape])
    out["input_ids"] = tf.cast(f["input_ids"], tf.int32)
    if context_shape is not None:
      out["context"] = tf.reshape(tf.io.decode_raw(f["context"], tf.float16), [-1, *context_shape])
    if class_labels:
      out["class_labels"] = tf.cast(out.pop("class_label")[:, 0], tf.int32)
    if embeddings_shape is not None:
      out["embeddings"] = tf.cast(tf.reshape(tf.io.decode_raw(f["embeddings"], tf.float16),
                                             [-1, *embeddings_shape]), tf.float32)
    return out

  ds = plan.flat_map(window).batch(local_batch, drop_remainder=True)
  return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(prefetch)


def tokenizer_fingerprint(tokenizer) -> str:
  """A short hash of a tokenizer's vocabulary and special ids: stored ids are only meaningful to
  the same tokenizer."""
  h = hashlib.sha1(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
  h.update(repr((tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)).encode())
  return h.hexdigest()[:16]


def stored_conditions(manifest: dict) -> Dict[str, Any]:
  """`latent_dataset` arguments for the conditions the shards hold (class labels, embeddings)."""
  shape = manifest.get("embeddings_shape")
  return {"class_labels": bool(manifest.get("class_field")),
          "embeddings_shape": list(shape) if shape else None}


def _check_conditions(config, manifest: dict) -> None:
  """Refuses shards that lack what the configured conditioner reads."""
  conditioner = config.model.get("conditioner")
  kind = conditioner.kind if conditioner is not None else ""
  source = config.data.latent_shards
  if kind == "class" and not manifest.get("class_field"):
    raise UserInputError(f"model.conditioner.kind='class' reads class_labels, but the latent shards "
                         f"{source} hold none; encode them with encode.class_field (e.g. 'cls').")
  if kind == "precomputed":
    shape = manifest.get("embeddings_shape")
    if not shape:
      raise UserInputError(f"model.conditioner.kind='precomputed' reads embeddings, but the latent "
                           f"shards {source} hold none; encode them with encode.embedding_field "
                           "(e.g. 'npy').")
    pre = conditioner.precomputed
    if list(shape) != [pre.length, pre.width]:
      raise UserInputError(f"The latent shards hold embeddings {list(shape)} [L, D]; "
                           f"model.conditioner.precomputed has length={pre.length}, "
                           f"width={pre.width}: set them to {shape[0]} and {shape[1]}.")


def _check_compatible(config, manifest: dict, tokenizer, vae_params) -> None:
  from latent_diffusion_jax.models import build
  _check_conditions(config, manifest)
  kind, field = first_stage(manifest), stored_field(manifest)
  if kind != config.autoencoder.kind:
    raise UserInputError(
        f"Latent shards hold {field} of a {kind.upper()} first stage, but autoencoder.kind="
        f"{config.autoencoder.kind!r}; set autoencoder.kind={kind!r} (with that first stage as "
        "frozen.vae) or encode the data with this run's first stage.")
  size = build.latent_size(config.model)
  if kind == "vq":
    channels = build.first_stage_latent_channels(build.build_first_stage(config))
  else:
    channels = 2 * config.model.vae.latent_channels
  if "buckets" in manifest:
    _check_buckets(config, manifest, field, channels)
  elif config.data.buckets:
    raise UserInputError(f"data.buckets={tuple(map(tuple, config.data.buckets))} but the latent "
                         f"shards {config.data.latent_shards} were encoded without buckets; encode "
                         "with these buckets or set data.buckets=().")
  elif list(manifest[f"{field}_shape"]) != [size, size, channels]:
    raise UserInputError(f"Latent shards hold {field} {manifest[f'{field}_shape']}, the model "
                         f"expects {[size, size, channels]} (model.image_size / VAE); encode at "
                         "this size.")
  te = config.model.text_encoder
  if build.conditioner_kind(config.model) in ("clip", "ldm_transformer") and (
      manifest["max_length"] != te.max_length):
    raise UserInputError(f"Latent shards hold {manifest['max_length']} token ids per caption, "
                     f"model.text_encoder.max_length is {te.max_length}.")
  if (tokenizer is not None
      and manifest["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer)):
    raise UserInputError("The latent shards' token ids come from another tokenizer than this run's "
                     "(frozen.tokenizer); re-encode or point frozen.tokenizer at the same one.")
  if vae_params is not None and config.data.check_vae_fingerprint:
    from latent_diffusion_jax.data.pre_encode import fingerprint
    if manifest["vae_fingerprint"] != fingerprint(vae_params):
      raise UserInputError("The latent shards were encoded by another VAE than this run's frozen.vae "
                       "(fingerprints differ), so samples would decode wrongly. Use the same VAE, "
                       "or set data.check_vae_fingerprint=False if the difference is intended.")
  if config.data.use_text_embeddings:
    if manifest.get("context_shape") is None:
      raise UserInputError("data.use_text_embeddings needs shards encoded with "
                       "encode.store_text_embeddings=True.")
    if te.trainable or config.diffusion.caption_dropout > 0:
      raise UserInputError("data.use_text_embeddings needs a frozen text encoder and "
                       "diffusion.caption_dropout=0 (the train step has no empty-prompt embedding "
                       "to drop captions to).")


def _check_buckets(config, manifest: dict, field: str, channels: int) -> None:
  from latent_diffusion_jax.data import buckets as buckets_lib
  stored = [tuple(b["size"]) for b in manifest["buckets"]]
  wanted = list(buckets_lib.check_buckets(config))
  if stored != wanted:
    raise UserInputError(f"The latent shards were encoded with buckets {stored}, data.buckets is "
                         f"{wanted}; set data.buckets to the encoded list (same order).")
  factor = buckets_lib.downsampling(config.model)[0]
  for b in manifest["buckets"]:
    expected = list(buckets_lib.latent_shape(tuple(b["size"]), factor, channels))
    if list(b[f"{field}_shape"]) != expected:
      raise UserInputError(f"Latent shards of bucket {tuple(b['size'])} hold {field} "
                           f"{b[f'{field}_shape']}, the model expects {expected}; encode with "
                           "this run's first stage.")


def training_reader(config, global_batch: int, *, tokenizer=None, vae_params=None,
                    process_index: Optional[int] = None,
                    process_count: Optional[int] = None) -> ResumableBatches:
  """This host's resumable batches of `config.data.latent_shards` for the diffusion trainer.

  Args:
    config: the run config (data.*, seed, model shapes for the compatibility checks).
    global_batch: examples per step over all hosts.
    tokenizer: the run's tokenizer, checked against the one that produced the stored ids.
    vae_params: the run's frozen VAE, checked against the encoding one (data.check_vae_fingerprint).
    process_index, process_count: this host's place; default: JAX's.

  Returns:
    Batches of {"moments" (KL) or "latents" (VQ), "input_ids"} (or "context" with
    data.use_text_embeddings), numpy, plus "class_labels" [B] and "embeddings" [B, L, D] when
    the shards hold them (encode.class_field, encode.embedding_field).
  """
  if not config.data.latent_shards:
    raise UserInputError("data.kind='latent_shards' needs data.latent_shards: the output directory of "
                     "`python -m latent_diffusion_jax.cli.encode` (or a pattern of its .tfrecord files).")
  files, counts, manifest = resolve_shards(config.data.latent_shards)
  _check_compatible(config, manifest, tokenizer, vae_params)
  pi, pc, mine = host_files(files, global_batch, "latent shards", process_index, process_count)
  host_counts = counts[pi::pc]
  use_context = bool(config.data.use_text_embeddings)
  from latent_diffusion_jax.models.build import conditioner_kind
  keep_ids = conditioner_kind(config.model) in ("clip", "ldm_transformer") and not use_context

  field = stored_field(manifest)
  def postprocess(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "input_ids" or keep_ids}

  listing = hashlib.sha1(json.dumps([files, counts]).encode()).hexdigest()[:16]
  identity = {"kind": "latent_shards", "seed": int(config.seed), "global_batch": int(global_batch)}
  if "buckets" in manifest:
    return _bucketed_reader(config, manifest, files, counts, field, global_batch, pi, pc,
                            use_context, postprocess, identity, listing)
  shape = {f"{field}_shape": manifest[f"{field}_shape"]}

  def make_dataset(start_batch: int) -> tf.data.Dataset:
    return latent_dataset(
        mine, host_counts, local_batch=global_batch // pc, seed=config.seed,
        start_batch=start_batch, **shape,
        storage_dtype=manifest["storage_dtype"], max_length=manifest["max_length"],
        context_shape=manifest["context_shape"] if use_context else None, process_index=pi,
        shuffle_buffer=config.data.shuffle_buffer, files_per_window=config.data.files_per_window,
        prefetch=config.data.prefetch, **stored_conditions(manifest))

  return ResumableBatches(make_dataset, postprocess=postprocess, identity=identity,
                          advisory={"process_count": pc, "files": listing})


def _bucketed_reader(config, manifest, files, counts, field, global_batch, pi, pc, use_context,
                     postprocess, identity, listing) -> ResumableBatches:
  """Every global batch from one bucket (data/bucketed_shards.py); the position stays one integer."""
  from latent_diffusion_jax.data import bucketed_shards
  # Every host plans from the whole listing, so all agree on the schedule.
  plan = bucketed_shards.plan_buckets(manifest, files, counts, field, global_batch=global_batch,
                                      seed=config.seed, process_index=pi, process_count=pc)

  def make_stream(position, host_files, host_counts, shape, start_batch):
    del position
    return latent_dataset(
        host_files, host_counts, local_batch=global_batch // pc, seed=config.seed,
        start_batch=start_batch, **{f"{field}_shape": shape},
        storage_dtype=manifest["storage_dtype"], max_length=manifest["max_length"],
        context_shape=manifest["context_shape"] if use_context else None, process_index=pi,
        shuffle_buffer=config.data.shuffle_buffer, files_per_window=config.data.files_per_window,
        prefetch=config.data.prefetch, **stored_conditions(manifest))

  def make_dataset(start_batch: int) -> tf.data.Dataset:
    return bucketed_shards.bucketed_dataset(plan, make_stream, start_batch)

  reader = ResumableBatches(make_dataset, postprocess=postprocess,
                            identity=dict(identity, buckets=plan.sizes),
                            advisory={"process_count": pc, "files": listing})
  reader.bucket_plan = plan
  return reader
