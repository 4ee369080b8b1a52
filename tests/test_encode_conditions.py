"""Class labels and precomputed embeddings stored next to the latents (encode.class_field,
encode.embedding_field): tar shards with .cls / .npy members -> encode -> the readers give the
same values back; samples missing or mangling the members are skipped with a reason."""

import io
import os

import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion_jax.core.config import load_config_file
from latent_diffusion_jax.core.errors import InputFileError
from latent_diffusion_jax.data import encoder_job, latent_shards as ls, shapes
from latent_diffusion_jax.data import webdataset as wds
from latent_diffusion_jax.data.tokenizers import build_word_tokenizer, load_tokenizer
from latent_diffusion_jax.models import build
from test_webdataset import RESOLUTION, image_bytes, sample, write_shard
from tiny_bundles import _init

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LENGTH = 12
EMBED_SHAPE = (5, 6)  # [L, D]


def npy(array) -> bytes:
  buf = io.BytesIO()
  np.save(buf, array)
  return buf.getvalue()


def good_samples(offset: int, count: int):
  """Samples with a class member and an embedding; the values identify the sample."""
  out = {}
  for i in range(offset, offset + count):
    files = sample(image_bytes(size=(20, 20), seed=i))
    files["cls"] = f"{i % 18}\n".encode()
    files["npy"] = npy(np.random.default_rng(i).standard_normal(EMBED_SHAPE).astype(np.float32))
    out[f"s{i:03d}"] = files
  return out


def bad_samples():
  """(samples, reason per key)."""
  base = lambda: good_samples(900, 1)["s900"]
  cases = {
      "no_cls": ({k: v for k, v in base().items() if k != "cls"}, "missing_class"),
      "text_cls": (dict(base(), cls=b"red circle"), "invalid_class"),
      "negative_cls": (dict(base(), cls=b"-3"), "invalid_class"),
      "no_npy": ({k: v for k, v in base().items() if k != "npy"}, "missing_embedding"),
      "not_npy": (dict(base(), npy=b"\x93NUMPY garbage"), "invalid_embedding"),
      "wrong_shape": (dict(base(), npy=npy(np.zeros((5, 7), np.float32))), "invalid_embedding"),
      "non_finite": (dict(base(), npy=npy(np.full(EMBED_SHAPE, np.inf, np.float32))),
                     "invalid_embedding"),
  }
  return {k: v[0] for k, v in cases.items()}, {k: v[1] for k, v in cases.items()}


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("encode_conditions")
  tokenizer = load_tokenizer(build_word_tokenizer(shapes.vocabulary(), str(tmp / "tok"),
                                                  MAX_LENGTH))
  c = load_config_file(os.path.join(ROOT, "configs/shapes_ldm.py:tiny"))
  c.model.image_size = RESOLUTION
  c.model.text_encoder.max_length = MAX_LENGTH
  c.encode.batch_size = 8
  c.encode.class_field, c.encode.embedding_field = "cls", "npy"
  c.model.conditioner.precomputed.length, c.model.conditioner.precomputed.width = EMBED_SHAPE
  vae = build.build_vae(c.model)
  vae_params = _init(vae, jnp.zeros((1, RESOLUTION, RESOLUTION, 3)), seed=1)
  encoder = encoder_job.BatchEncoder(vae, vae_params, batch_size=8)
  inputs = tmp / "shards"
  inputs.mkdir()
  bad, reasons = bad_samples()
  samples = {0: good_samples(0, 6), 1: {**good_samples(6, 5), **bad}}
  for index, group in samples.items():
    write_shard(inputs / f"{index:05d}.tar", group)
  out = tmp / "latents"
  summary = encoder_job.encode_shards(c, str(inputs / "*.tar"), str(out), encoder=encoder,
                                      tokenizer=tokenizer)
  return dict(config=c, out=out, summary=summary, reasons=reasons,
              good={**samples[0], **good_samples(6, 5)}, vae_params=vae_params)


def test_missing_or_invalid_members_are_skipped_with_a_reason(encoded):
  summary = encoded["summary"]
  expected = {}
  for reason in encoded["reasons"].values():
    expected[reason] = expected.get(reason, 0) + 1
  assert summary["skipped"] == expected
  assert summary["kept"] == len(encoded["good"]) == 11
  manifest = ls.read_json(os.path.join(encoded["out"], ls.MANIFEST))
  assert manifest["class_field"] == "cls" and manifest["embeddings_shape"] == list(EMBED_SHAPE)


def test_a_run_that_kept_nothing_is_an_error(encoded):
  encoder_job.check_kept(encoded["summary"])  # some kept: fine
  nothing = dict(encoded["summary"], kept=0)
  with pytest.raises(InputFileError, match=r"All \d+ samples read were skipped \(.*missing"):
    encoder_job.check_kept(nothing)
  encoder_job.check_kept({"read": 0, "kept": 0, "skipped": {}})  # a host without shards


def test_stored_values_read_back_equal(encoded):
  records = [r for name in ("00000.tfrecord", "00001.tfrecord")
             for r in ls.read_shard(os.path.join(encoded["out"], name))]
  assert sorted(r["key"] for r in records) == sorted(encoded["good"])
  for r in records:
    files = encoded["good"][r["key"]]
    assert r["class_label"] == int(files["cls"])
    want = np.load(io.BytesIO(files["npy"])).astype(np.float16)
    assert r["embeddings"].dtype == np.float16
    np.testing.assert_array_equal(r["embeddings"], want)


def test_training_reader_yields_class_labels_and_embeddings(encoded):
  c = encoded["config"].copy_and_resolve_references()
  c.data.kind, c.data.latent_shards = "latent_shards", str(encoded["out"])
  c.data.shuffle_buffer, c.data.files_per_window = 4, 2
  c.model.conditioner.kind = "precomputed"
  reader = ls.training_reader(c, 4, vae_params=encoded["vae_params"], process_index=0,
                              process_count=1)
  batch = next(iter(reader))
  assert batch["class_labels"].dtype == np.int32 and batch["class_labels"].shape == (4,)
  assert batch["embeddings"].dtype == np.float32 and batch["embeddings"].shape == (4, *EMBED_SHAPE)
  # Each row's label and embedding belong to the same sample: find it by its embedding.
  by_embedding = {np.load(io.BytesIO(f["npy"])).astype(np.float16).tobytes(): int(f["cls"])
                  for f in encoded["good"].values()}
  for label, embedding in zip(batch["class_labels"], batch["embeddings"]):
    assert by_embedding[embedding.astype(np.float16).tobytes()] == label

  c.model.conditioner.precomputed.width = 7
  with pytest.raises(ValueError, match="width=7"):
    ls.training_reader(c, 4, process_index=0, process_count=1)


def test_raw_shard_reader_yields_them_too(encoded, tmp_path):
  c = encoded["config"].copy_and_resolve_references()
  write_shard(tmp_path / "00000.tar", good_samples(0, 4))
  c.data.kind, c.data.webdataset = "webdataset", str(tmp_path / "00000.tar")
  c.data.shuffle_buffer = 1
  batch = next(iter(wds.training_reader(c, 4, process_index=0, process_count=1)))
  assert sorted(batch["class_labels"].tolist()) == [0, 1, 2, 3]
  want = {i: np.random.default_rng(i).standard_normal(EMBED_SHAPE).astype(np.float16)
          for i in range(4)}
  for label, embedding in zip(batch["class_labels"], batch["embeddings"]):
    np.testing.assert_array_equal(embedding, want[int(label)].astype(np.float32))


def test_shards_without_classes_refuse_a_class_conditioner(tmp_path):
  from test_latent_shards import reader_config, write_latent_shards
  directory = write_latent_shards(str(tmp_path / "plain"), counts=(3,))
  c = reader_config(directory)
  c.model.conditioner.kind = "class"
  with pytest.raises(ValueError, match="encode.class_field"):
    ls.training_reader(c, 2, process_index=0, process_count=1)
