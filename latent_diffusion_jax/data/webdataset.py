"""WebDataset tar shards in img2dataset's LAION layout, read with tf.data.

A shard holds, per sample, KEY.jpg (or .jpeg/.png/.webp), KEY.txt (the caption) and KEY.json
(metadata: width, height, similarity, pwatermark, punsafe, original_width, ...). Members of one
sample are consecutive, as webdataset writes them. Shards are named by a local path, a glob, a
brace pattern (`shards/{00000..00127}.tar`) or any path tf.io.gfile reads (gs://...).

Every sample leaves the reader as a record with a `status`: "" keeps it, anything else is the
skip reason. Shard-level failures become one record each, since the samples they held are unknown:
  unreadable_shard   the shard cannot be opened or is not a tar (key: the shard path).
  truncated_tar      the archive ends inside a sample; that sample is skipped (key: its key).
Sample-level reasons (checked in this order; image reasons are in image_decode.py):
  missing_image      no image member.
  missing_caption    no .txt member (only when captions are required: a text-conditioned model).
  missing_control    no control image member (only with `control_member`, ControlNet training).
  empty_caption      a caption that is empty after stripping whitespace (likewise).
  missing_metadata   an enabled metadata filter needs a field that the json lacks (a missing or
                     unparsable json counts as unknown metadata: kept unless a filter needs it).
  watermark / unsafe / low_similarity   the metadata filters.
  missing_class / invalid_class           with encode.class_field: the member is absent, or not
                     one integer >= 0 in text.
  missing_embedding / invalid_embedding   with encode.embedding_field: the member is absent, or not
                     a finite float array saved by np.save with the configured shape [L, D].
Each shard ends with one `SHARD_END` record, so a consumer knows when a shard's samples are done.
"""

import dataclasses
import functools
import io
import json
import math
import posixpath
import tarfile
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

from latent_diffusion_jax.data import buckets as buckets_lib
from latent_diffusion_jax.data.image_decode import SkipSample, preprocess_image
from latent_diffusion_jax.data.shard_reading import ResumableBatches, expand_patterns, host_files
from latent_diffusion_jax.core.errors import UserInputError

SHARD_END = "shard_end"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
def split_key(name: str) -> Tuple[str, str]:
  """webdataset's rule: the key is the member path up to the first dot of its file name."""
  directory, base = posixpath.split(name)
  stem, _, ext = base.partition(".")
  return posixpath.join(directory, stem), ext.lower()


class _MarkerAwareTarInfo(tarfile.TarInfo):
  """Notes when an archive ends without its end-of-archive zero blocks: tarfile silently treats
  such a cut at a member boundary as a normal end, which would lose samples unnoticed."""

  @classmethod
  def fromtarfile(cls, tar):
    try:
      return super().fromtarfile(tar)
    except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
      tar.ended_without_marker = True
      raise


def iter_tar_samples(path: str) -> Iterator[Tuple[str, Dict[str, bytes], Optional[str]]]:
  """Streams (key, {extension: bytes}, error) groups from a tar shard; never raises.

  `error` is None for a complete group, else "unreadable_shard" (key = the shard path) or
  "truncated_tar" (the group being read when the archive broke off). Reading streams (mode
  "r|*"), so object stores need no seeks and gzip-compressed tars work too.
  """
  key, files, members = None, {}, 0
  try:
    with tf.io.gfile.GFile(path, "rb") as f, tarfile.open(
        fileobj=f, mode="r|*", tarinfo=_MarkerAwareTarInfo) as tar:
      for member in tar:
        if not member.isfile():
          continue
        member_key, ext = split_key(member.name)
        data = tar.extractfile(member).read()
        if len(data) != member.size:
          raise EOFError(f"member {member.name} has {len(data)} of {member.size} bytes")
        members += 1
        if member_key != key and key is not None:
          yield key, files, None
          files = {}
        key = member_key
        files[ext] = data
      if getattr(tar, "ended_without_marker", False):
        raise EOFError("the archive ends without its end-of-archive marker")
  except Exception as e:  # any I/O, tar or decompression error ends this shard only
    reason = "truncated_tar" if members else "unreadable_shard"
    logging.warning("Shard %s: %s after %d members (%s: %s)", path, reason, members,
                    type(e).__name__, e)
    yield (key if members else path), files, reason
    return
  if key is not None:
    yield key, files, None


def write_tar_shard(path: str, samples) -> None:
  """Writes (key, {extension: bytes}) samples as a LAION-layout shard (tests, benchmarks, demos)."""
  import io
  with tf.io.gfile.GFile(path, "wb") as f, tarfile.open(fileobj=f, mode="w|") as tar:
    for key, files in samples:
      for ext, data in files.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """Sample filters and the image crop (see config.py's `encode` section for the meaning)."""
  resolution: int
  crop: str = "center"
  seed: int = 0
  require_caption: bool = True
  min_image_size: int = 0
  max_aspect_ratio: float = 0.0
  max_watermark: float = 1.0
  max_unsafe: float = 1.0
  min_similarity: float = 0.0
  # Aspect-ratio buckets, (height, width) each (data.buckets); empty: `resolution` squares.
  buckets: Tuple[Tuple[int, int], ...] = ()
  # A member decoded and cropped like the image, e.g. "control.png" (data.control_member); "" none.
  control_member: str = ""
  # Members holding a class label and a precomputed embedding of shape `embedding_shape` [L, D]
  # (encode.class_field, encode.embedding_field); "" reads none.
  class_field: str = ""
  embedding_field: str = ""
  embedding_shape: Tuple[int, ...] = ()

  @classmethod
  def from_config(cls, config) -> "Preprocessing":
    e = config.encode
    return cls(resolution=e.resolution or config.model.image_size, crop=e.crop, seed=config.seed,
               require_caption=reads_text(config),
               min_image_size=e.min_image_size, max_aspect_ratio=e.max_aspect_ratio,
               max_watermark=e.max_watermark, max_unsafe=e.max_unsafe,
               min_similarity=e.min_similarity,
               buckets=buckets_lib.parse_buckets(config.data.get("buckets", ())),
               control_member=config.data.get("control_member", ""),
               **condition_fields(config))

  @property
  def canvas(self) -> Tuple[int, int]:
    """(height, width) of the `pixels` arrays: the square, or with buckets the smallest size that
    holds each bucket's crop (placed at the top left, zeros around it)."""
    if self.buckets:
      return buckets_lib.canvas(self.buckets)
    return self.resolution, self.resolution

  def describe(self) -> dict:
    """The settings an encode job records; without buckets exactly the keys it always had."""
    out = dataclasses.asdict(self)
    if not self.control_member:
      out.pop("control_member")
    if not self.buckets:
      out.pop("buckets")
    else:
      out["buckets"] = [list(b) for b in self.buckets]
    # Likewise without stored conditions, so jobs written before them resume unchanged.
    for key in ("class_field", "embedding_field", "embedding_shape"):
      if not out[key]:
        out.pop(key)
    if self.embedding_shape:
      out["embedding_shape"] = list(self.embedding_shape)
    return out


def reads_text(config) -> bool:
  """Whether the model is conditioned on captions (a text conditioner), so samples need one."""
  from latent_diffusion_jax.models.build import conditioner_kind
  return conditioner_kind(config.model) in ("clip", "ldm_transformer")


def condition_fields(config) -> dict:
  """The `Preprocessing` fields of encode.class_field / encode.embedding_field."""
  e = config.encode
  embedding_field = e.get("embedding_field", "")
  shape = ()
  if embedding_field:
    pre = config.model.conditioner.precomputed
    shape = (int(pre.length), int(pre.width))
  return {"class_field": e.get("class_field", ""), "embedding_field": embedding_field,
          "embedding_shape": shape}


def _number(meta: dict, name: str) -> Optional[float]:
  value = meta.get(name)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
    return None
  return float(value)


def _metadata_status(meta: dict, prep: Preprocessing) -> Tuple[str, str]:
  checks = (("pwatermark", prep.max_watermark < 1, lambda v: v > prep.max_watermark, "watermark"),
            ("punsafe", prep.max_unsafe < 1, lambda v: v > prep.max_unsafe, "unsafe"),
            ("similarity", prep.min_similarity > 0, lambda v: v < prep.min_similarity,
             "low_similarity"))
  for field, enabled, fails, reason in checks:
    if not enabled:
      continue
    value = _number(meta, field)
    if value is None:
      return "missing_metadata", field
    if fails(value):
      return reason, f"{field}={value}"
  return "", ""


def check_sample(key: str, files: Dict[str, bytes],
                 prep: Preprocessing) -> Tuple[str, str, bytes, str, Tuple[int, int]]:
  """Applies the checks that need no pixels.

  Returns:
    (status, detail, image bytes, caption, original (height, width) from the json or (0, 0));
    status "" keeps the sample.
  """
  ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
  if ext is None:
    return "missing_image", f"members {sorted(files)}", b"", "", (0, 0)
  caption = files["txt"].decode("utf-8", errors="replace").strip() if "txt" in files else None
  if prep.require_caption and caption is None:
    return "missing_caption", "", b"", "", (0, 0)
  if prep.require_caption and not caption:
    return "empty_caption", "", b"", "", (0, 0)
  if prep.control_member and prep.control_member.lower() not in files:
    return "missing_control", f"members {sorted(files)}", b"", "", (0, 0)
  meta = {}
  if "json" in files:
    try:
      meta = json.loads(files["json"].decode("utf-8", errors="replace"))
      meta = meta if isinstance(meta, dict) else {}
    except ValueError:
      logging.info("Sample %s: unparsable json, metadata unknown", key)
  status, detail = _metadata_status(meta, prep)
  if status:
    return status, detail, b"", "", (0, 0)
  height, width = _number(meta, "original_height"), _number(meta, "original_width")
  original = (int(height), int(width)) if height and width and height > 0 and width > 0 else (0, 0)
  return "", "", files[ext], caption or "", original


def check_conditions(files: Dict[str, bytes], prep: Preprocessing) -> Tuple[str, str, int, bytes]:
  """Reads the class label and the embedding members a sample must have.

  Returns:
    (status, detail, class label or -1, embedding as float16 bytes or b""); status "" keeps it.
  """
  label, embedding = -1, b""
  if prep.class_field:
    if prep.class_field not in files:
      return "missing_class", f"no .{prep.class_field} member", -1, b""
    text = files[prep.class_field].decode("utf-8", errors="replace").strip()
    try:
      label = int(text)
    except ValueError:
      label = -1
    if label < 0:
      return "invalid_class", f".{prep.class_field}={text[:40]!r}", -1, b""
  if prep.embedding_field:
    if prep.embedding_field not in files:
      return "missing_embedding", f"no .{prep.embedding_field} member", -1, b""
    try:
      array = np.load(io.BytesIO(files[prep.embedding_field]), allow_pickle=False)
    except Exception as e:  # not an .npy file
      return "invalid_embedding", f"not np.save output ({type(e).__name__})", -1, b""
    if array.dtype.kind not in "fiu" or tuple(array.shape) != tuple(prep.embedding_shape):
      return ("invalid_embedding", f"{array.dtype} {list(array.shape)}, expected float "
              f"{list(prep.embedding_shape)} (model.conditioner.precomputed length, width)",
              -1, b"")
    stored = array.astype(np.float16)
    if not np.isfinite(stored).all():
      return "invalid_embedding", "non-finite values (in float16)", -1, b""
    embedding = stored.tobytes()
  return "", "", label, embedding


_RECORD_SIGNATURE = {
    "shard": tf.TensorSpec([], tf.int32), "key": tf.TensorSpec([], tf.string),
    "status": tf.TensorSpec([], tf.string), "detail": tf.TensorSpec([], tf.string),
    "image": tf.TensorSpec([], tf.string), "caption": tf.TensorSpec([], tf.string),
    "original_size": tf.TensorSpec([2], tf.int32), "control": tf.TensorSpec([], tf.string),
    "class_label": tf.TensorSpec([], tf.int64), "embedding": tf.TensorSpec([], tf.string),
}


def _shard_records(path: bytes, index: int, prep: Preprocessing):
  path = path.decode("utf-8")
  control_ext = prep.control_member.lower()
  for key, files, error in iter_tar_samples(path):
    label, embedding = -1, b""
    try:
      status, detail, image, caption, original = (
          (error, "", b"", "", (0, 0)) if error else check_sample(key, files, prep))
      if not status:
        status, detail, label, embedding = check_conditions(files, prep)
        if status:
          image, caption, original = b"", "", (0, 0)
    except Exception as e:  # a bug-shaped input must not stop the job
      status, detail, image, caption, original = "invalid_sample", repr(e), b"", "", (0, 0)
    control = files.get(control_ext, b"") if control_ext and not status else b""
    yield {"shard": index, "key": key, "status": status, "detail": detail, "image": image,
           "caption": caption, "original_size": np.asarray(original, np.int32), "control": control,
           "class_label": np.int64(label), "embedding": embedding}
  yield {"shard": index, "key": path, "status": SHARD_END, "detail": "", "image": b"",
         "caption": "", "original_size": np.zeros(2, np.int32), "control": b"",
         "class_label": np.int64(-1), "embedding": b""}


def read_samples(files: Sequence[str], prep: Preprocessing, *, parallel_shards: int = 8,
                 parallel_decode: int = tf.data.AUTOTUNE) -> tf.data.Dataset:
  """Records of `files`, decoded and cropped, in a deterministic order.

  Shards are interleaved (one sample from each of `parallel_shards` open shards in turn); images
  decode in parallel threads (PIL releases the GIL while decoding and resizing).

  Returns:
    A dataset of dicts: shard (index into `files`), key, status, detail, caption, pixels
    (uint8 [R, R, 3]; zeros unless kept; with buckets the `prep.canvas`, the crop at its top
    left), bucket (int32; -1 without buckets or when skipped), original_size and crop_offset
    (int32 [2]), class_label (int64; -1 unless prep.class_field) and embedding (float16 bytes of
    [L, D]; empty unless prep.embedding_field); with `prep.control_member` also control (uint8
    like pixels: the member resized and cropped as the image).
  """
  if not files:
    raise UserInputError("No shards to read.")
  generator = functools.partial(_shard_records, prep=prep)
  ds = tf.data.Dataset.from_tensor_slices((list(files), np.arange(len(files), dtype=np.int32)))
  ds = ds.interleave(
      lambda path, index: tf.data.Dataset.from_generator(
          generator, args=(path, index), output_signature=_RECORD_SIGNATURE),
      cycle_length=max(1, min(parallel_shards, len(files))), block_length=1,
      num_parallel_calls=max(1, min(parallel_shards, len(files))), deterministic=True)
  return ds.map(functools.partial(_decode_record, prep=prep), num_parallel_calls=parallel_decode,
                deterministic=True)


def _decode_control(data: bytes, key: str, prep: Preprocessing) -> np.ndarray:
  """The control member resized and cropped as the image of the same sample: the same square
  crop of the short-side-resized picture (its key seeds a random crop the same way), so a
  control image of the image's size lines up pixel for pixel."""
  return preprocess_image(data, resolution=prep.resolution, key=key, crop=prep.crop,
                          seed=prep.seed).pixels


def _decode_py(status, image, key, original, control, prep: Preprocessing):
  blank = np.zeros((*prep.canvas, 3), np.uint8)
  none = np.int32(-1)
  if status:
    return status, b"", blank, original, np.zeros(2, np.int32), none, blank
  key = key.decode("utf-8", "replace")
  try:
    out = preprocess_image(image, resolution=prep.resolution, key=key,
                           crop=prep.crop, seed=prep.seed, min_size=prep.min_image_size,
                           max_aspect_ratio=prep.max_aspect_ratio,
                           original_size=tuple(original) if original.all() else None,
                           buckets=prep.buckets)
    hint = _decode_control(control, key, prep) if prep.control_member else blank
  except SkipSample as e:
    return e.reason.encode(), e.detail.encode(), blank, original, np.zeros(2, np.int32), none, blank
  except Exception as e:  # whatever PIL raises past its documented errors
    return (b"corrupt_image", repr(e).encode(), blank, original, np.zeros(2, np.int32), none,
            blank)
  pixels = out.pixels
  if prep.buckets:  # one shape for tf.data: the crop at the canvas's top left
    blank[:pixels.shape[0], :pixels.shape[1]] = pixels
    pixels = blank
  return (b"", b"", pixels, np.asarray(out.original_size, np.int32),
          np.asarray(out.crop_offset, np.int32), np.int32(out.bucket), hint)


def _decode_record(record, prep: Preprocessing):
  status, detail, pixels, original, crop, bucket, control = tf.numpy_function(
      functools.partial(_decode_py, prep=prep),
      [record["status"], record["image"], record["key"], record["original_size"],
       record["control"]],
      [tf.string, tf.string, tf.uint8, tf.int32, tf.int32, tf.int32, tf.uint8], stateful=False)
  out = {k: v for k, v in record.items() if k not in ("image", "control")}
  out["detail"] = tf.where(tf.strings.length(detail) > 0, detail, record["detail"])
  out["status"] = tf.ensure_shape(status, [])
  out["pixels"] = tf.ensure_shape(pixels, [*prep.canvas, 3])
  out["bucket"] = tf.ensure_shape(bucket, [])
  out["original_size"] = tf.ensure_shape(original, [2])
  out["crop_offset"] = tf.ensure_shape(crop, [2])
  if prep.control_member:
    out["control"] = tf.ensure_shape(control, [*prep.canvas, 3])
  return out


def tokenize_captions(tokenizer, captions: Sequence[str],
                      max_length: int) -> Tuple[np.ndarray, np.ndarray]:
  """Token ids of web captions, cutting long ones (web captions often exceed CLIP's 77 tokens).

  Unlike `tokenizers.tokenize`, which refuses long or out-of-vocabulary prompts, this keeps every
  caption: a long one keeps its first `max_length - 1` tokens plus the end token, as Stable
  Diffusion's training does.

  Returns:
    (ids int32 [n, max_length] padded with the pad token, too_long bool [n]).
  """
  ids = np.full((len(captions), max_length), tokenizer.pad_token_id, np.int32)
  too_long = np.zeros(len(captions), bool)
  if not len(captions):
    return ids, too_long
  encoded = tokenizer(list(captions), add_special_tokens=True, padding=False,
                      truncation=False)["input_ids"]
  for row, tokens in enumerate(encoded):
    if len(tokens) > max_length:
      too_long[row] = True
      tokens = tokens[:max_length - 1] + [tokens[-1]]
    ids[row, :len(tokens)] = tokens
  return ids, too_long


def training_dataset(files: Sequence[str], prep: Preprocessing, *, local_batch: int, seed: int,
                     start_batch: int, shuffle_buffer: int, parallel_shards: int = 8
                     ) -> tf.data.Dataset:
  """Endless batches of kept {"pixels", "caption", "class_label", "embedding"} for training on raw
  shards (small runs).

  Deterministic for `seed`; starting at batch `start_batch` replays the kept samples before it
  (decoding them again), so resuming costs as much as reading that many samples.
  """
  ds = read_samples(files, prep, parallel_shards=parallel_shards)
  ds = ds.filter(lambda r: tf.strings.length(r["status"]) == 0)
  fields = ("pixels", "caption", "class_label", "embedding")
  fields += ("control",) if prep.control_member else ()
  ds = ds.map(lambda r: {k: r[k] for k in fields})
  ds = ds.repeat().shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  ds = ds.skip(start_batch * local_batch)
  return ds.batch(local_batch, drop_remainder=True)


def training_reader(config, global_batch: int, *, tokenizer=None,
                    process_index: Optional[int] = None, process_count: Optional[int] = None):
  """This host's resumable batches of `config.data.webdataset` for the trainers.

  Images are decoded and cropped to model.image_size with the encode.* filters (a random crop is
  fixed per key, not redrawn each epoch); captions are tokenized when a tokenizer is given
  (stage 2) and required only then.

  Returns:
    A `shard_reading.ResumableBatches` of {"images": uint8 [B, S, S, 3], "input_ids"}, with
    "class_labels" int32 [B] / "embeddings" float32 [B, L, D] when encode.class_field /
    encode.embedding_field name their members, and "control" (float32 [B, S, S, 3] in [0, 1])
    with `data.control_member`.
  """
  if not config.data.webdataset:
    raise UserInputError("data.kind='webdataset' needs data.webdataset: tar shards as a path, glob or "
                     "brace pattern.")
  files = expand_patterns(config.data.webdataset)
  pi, pc, mine = host_files(files, global_batch, "tar shards", process_index, process_count)
  # Raw-shard training crops squares; aspect buckets need the latent_shards path.
  prep = dataclasses.replace(Preprocessing.from_config(config), resolution=config.model.image_size,
                             require_caption=tokenizer is not None, buckets=())
  max_length = config.model.text_encoder.max_length

  def make_dataset(start_batch: int) -> tf.data.Dataset:
    return training_dataset(mine, prep, local_batch=global_batch // pc, seed=config.seed,
                            start_batch=start_batch, shuffle_buffer=config.data.shuffle_buffer,
                            parallel_shards=config.encode.parallel_shards
                            ).prefetch(config.data.prefetch)

  def postprocess(batch: dict) -> dict:
    out = {"images": batch["pixels"]}
    if "control" in batch:  # diffusers' control images: float in [0, 1]
      out["control"] = batch["control"].astype(np.float32) / 255.0
    if prep.class_field:
      out["class_labels"] = batch["class_label"].astype(np.int32)
    if prep.embedding_field:
      out["embeddings"] = np.stack([np.frombuffer(b, np.float16).reshape(prep.embedding_shape)
                                    for b in batch["embedding"]]).astype(np.float32)
    if tokenizer is not None:
      captions = [c.decode("utf-8") for c in batch["caption"]]
      out["input_ids"] = tokenize_captions(tokenizer, captions, max_length)[0]
    return out

  return ResumableBatches(make_dataset, postprocess=postprocess,
                          identity={"kind": "webdataset", "seed": int(config.seed),
                                    "global_batch": int(global_batch)},
                          advisory={"process_count": pc, "files": len(files)})
