"""The encode job: tar shards with broken members -> latent shards, with tiny random models on the
8 fake CPU devices. Counts per reason, read-back shapes/dtypes/values, resume, host split."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion_jax.core.config import load_config_file
from latent_diffusion_jax.data import encoder_job, latent_shards as ls, shapes
from latent_diffusion_jax.data import webdataset as wds
from latent_diffusion_jax.data.image_decode import preprocess_image
from latent_diffusion_jax.data.tokenizers import build_word_tokenizer, load_tokenizer
from latent_diffusion_jax.models import build
from test_webdataset import (RESOLUTION, broken_samples, image_bytes, kept_samples, sample,
                             truncate_file, write_shard)
from tiny_bundles import _init

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LENGTH = 12
# Stored float16 moments vs a float32 encode of the same pixels: float16 keeps 11 significant bits
# (relative error <= 2^-11 ~ 5e-4); values here are O(1).
FP16_RTOL, FP16_ATOL = 2e-3, 2e-3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("encode")
  tokenizer = load_tokenizer(build_word_tokenizer(shapes.vocabulary(), str(tmp / "tok"),
                                                  MAX_LENGTH))
  c = load_config_file(os.path.join(ROOT, "configs/shapes_ldm.py:tiny"))
  c.model.image_size = RESOLUTION
  te = c.model.text_encoder
  te.kind, te.trainable, te.max_length = "clip", False, MAX_LENGTH
  te.clip.update(vocab_size=len(tokenizer.get_vocab()), hidden_size=32, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LENGTH)
  c.encode.batch_size = 8
  c.encode.store_text_embeddings = True
  vae, text = build.build_vae(c.model), build.build_text_encoder(c.model)
  vae_params = _init(vae, jnp.zeros((1, RESOLUTION, RESOLUTION, 3)), seed=1)
  text_params = _init(text, jnp.zeros((1, MAX_LENGTH), jnp.int32), seed=2)
  encoder = encoder_job.BatchEncoder(vae, vae_params, text, text_params, batch_size=8)

  inputs = tmp / "shards"
  inputs.mkdir()
  broken, reasons = broken_samples()
  write_shard(inputs / "00000.tar", kept_samples())
  write_shard(inputs / "00001.tar", broken)  # nothing kept: an empty output shard
  write_shard(inputs / "00002.tar", {f"t{i}": sample(image_bytes(size=(20, 20), seed=30 + i))
                                     for i in range(4)})
  truncate_file(inputs / "00002.tar", 0.6)
  write_shard(inputs / "00003.tar", {f"m{i}": sample(image_bytes(seed=40 + i), meta=None)
                                     for i in range(11)})  # no json: kept (no filter needs it)
  pattern = str(inputs / "{00000..00004}.tar")  # 00004.tar does not exist
  run = lambda out, **kw: encoder_job.encode_shards(c, pattern, str(out), encoder=encoder,
                                                     tokenizer=tokenizer, scale_factor=0.5, **kw)
  full = tmp / "full"
  summary = run(full)
  return dict(config=c, encoder=encoder, tokenizer=tokenizer, vae=vae, vae_params=vae_params,
              text=text, text_params=text_params, run=run, full=full, summary=summary, tmp=tmp,
              reasons=reasons)


def _records(directory):
  return {name: ls.read_shard(os.path.join(directory, name))
          for name in sorted(os.listdir(directory)) if name.endswith(ls.SHARD_SUFFIX)}


def test_counts_per_reason_and_manifest(setup):
  summary = setup["summary"]
  expected = {}
  for reason in setup["reasons"].values():
    expected[reason] = expected.get(reason, 0) + 1
  expected.update(truncated_tar=1, unreadable_shard=1)
  assert summary["skipped"] == expected
  assert summary["kept"] == len(kept_samples()) + 2 + 11
  assert summary["kept"] + sum(summary["skipped"].values()) == summary["read"]
  assert summary["captions_truncated"] == 1
  manifest = ls.read_json(os.path.join(setup["full"], ls.MANIFEST))
  assert manifest["num_examples"] == summary["kept"] and manifest["num_shards"] == 5
  assert manifest["moments_shape"] == [RESOLUTION // 4, RESOLUTION // 4, 8]
  assert manifest["context_shape"] == [MAX_LENGTH, 32] and manifest["storage_dtype"] == "float16"
  assert manifest["latent_scale_factor"] == 0.5 and manifest["estimated_scale_factor"] > 0
  assert manifest["vae_fingerprint"] == encoder_job.fingerprint(setup["vae_params"])
  assert manifest["shards"]["00001.tfrecord"]["kept"] == 0
  assert manifest["shards"]["00004.tfrecord"]["skipped"] == {"unreadable_shard": 1}
  table = encoder_job.format_table(summary)
  assert "skipped: truncated_image" in table and "kept" in table


def test_read_back_equals_direct_encoding(setup):
  records = _records(setup["full"])
  assert {n: len(r) for n, r in records.items()} == {
      "00000.tfrecord": 8, "00001.tfrecord": 0, "00002.tfrecord": 2, "00003.tfrecord": 11,
      "00004.tfrecord": 0}
  first = records["00000.tfrecord"]
  kept = kept_samples()
  assert [r["key"] for r in first] == sorted(kept)  # input order
  pixels, ids = [], []
  for r in first:
    files = kept[r["key"]]
    data = next(v for k, v in files.items() if k in wds.IMAGE_EXTENSIONS)
    eager = preprocess_image(data, resolution=RESOLUTION, key=r["key"])
    pixels.append(eager.pixels)
    ids.append(wds.tokenize_captions(setup["tokenizer"], [files["txt"].decode()], MAX_LENGTH)[0][0])
    assert r["moments"].dtype == np.float16 and r["moments"].shape == (4, 4, 8)
    assert r["context"].dtype == np.float16 and r["context"].shape == (MAX_LENGTH, 32)
    assert r["crop_offset"] == eager.crop_offset and r["caption"] == files["txt"].decode()
  assert first[sorted(kept).index("rgb_jpeg")]["original_size"] == (240, 400)
  np.testing.assert_array_equal(np.stack([r["input_ids"] for r in first]), np.stack(ids))
  vae, text = setup["vae"], setup["text"]
  x = jnp.asarray(np.stack(pixels), jnp.float32) / 127.5 - 1.0
  # One jitted call: op-by-op dispatch of the VAE costs more than its compile here.
  direct = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))(
      setup["vae_params"], x)
  np.testing.assert_allclose(np.stack([r["moments"] for r in first]).astype(np.float32),
                             np.asarray(direct), rtol=FP16_RTOL, atol=FP16_ATOL)
  context = jax.jit(lambda p, i: text.apply({"params": p}, i)[0])(setup["text_params"],
                                                                  np.stack(ids))
  np.testing.assert_allclose(np.stack([r["context"] for r in first]).astype(np.float32),
                             np.asarray(context), rtol=FP16_RTOL, atol=FP16_ATOL)


def test_resume_after_interrupt_gives_same_output(setup):
  out = setup["tmp"] / "interrupted"

  def crash_after_first(name):
    raise KeyboardInterrupt(f"killed after {name}")

  with pytest.raises(KeyboardInterrupt):
    setup["run"](out, after_shard=crash_after_first)
  finished = [n for n in os.listdir(out) if n.endswith(ls.SHARD_SUFFIX)]
  assert len(finished) == 1 and not (out / ls.MANIFEST).exists()
  summary = setup["run"](out)
  for key in ("read", "kept", "skipped", "captions_truncated"):
    assert summary[key] == setup["summary"][key]
  for name in _records(setup["full"]):
    assert (out / name).read_bytes() == (setup["full"] / name).read_bytes(), name
  assert not [n for n in os.listdir(out) if ".tmp" in n]
  # A third run finds everything done and encodes nothing.
  assert setup["run"](out, after_shard=crash_after_first)["kept"] == summary["kept"]


def test_two_hosts_split_the_shards(setup):
  out = setup["tmp"] / "hosts"
  second = setup["run"](out, process_index=1, process_count=2)
  assert sorted(second["shards"]) == ["00001.tfrecord", "00003.tfrecord"]
  assert second["manifest"] is None  # host 0 has not finished yet
  first = setup["run"](out, process_index=0, process_count=2)
  assert sorted(first["shards"]) == ["00000.tfrecord", "00002.tfrecord", "00004.tfrecord"]
  assert first["read"] + second["read"] == setup["summary"]["read"]
  manifest = ls.read_json(first["manifest"])
  assert manifest["num_examples"] == setup["summary"]["kept"]
  for name in _records(setup["full"]):
    assert (out / name).read_bytes() == (setup["full"] / name).read_bytes(), name


def test_changed_settings_are_refused(setup):
  out = setup["tmp"] / "changed"
  shutil.copytree(setup["full"], out)
  job = ls.read_json(str(out / ls.JOB_FILE))
  ls.write_json(str(out / ls.JOB_FILE), dict(job, storage_dtype="bfloat16"))
  with pytest.raises(ValueError, match="storage_dtype"):
    setup["run"](out)


def test_encoder_compiles_once_for_all_runs(setup):
  # The full, interrupted, resumed and per-host runs all pad to one batch shape.
  for name in ("test_resume_after_interrupt_gives_same_output", "test_two_hosts_split_the_shards"):
    assert (setup["tmp"] / ("interrupted" if "resume" in name else "hosts")).exists()
  assert setup["encoder"]._encode._cache_size() == 1
