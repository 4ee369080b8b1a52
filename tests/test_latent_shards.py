"""Latent shards: example round trip, the training reader's determinism, exact resume, per-host
split, compatibility checks, and 2 training steps from shards on the 8 fake CPU devices."""

import glob
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

from latent_diffusion_jax.core.config import base_config, load_config_file
from latent_diffusion_jax.data import latent_shards as ls
from latent_diffusion_jax.data import shard_reading
from latent_diffusion_jax.data import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTS = (7, 3, 0, 9, 5)  # records per file; one empty file
MAX_LENGTH = 12


def write_latent_shards(directory, counts=COUNTS, moments_shape=(4, 4, 8), dtype=np.float16,
                        **manifest_fields):
  """Synthetic shards: example n of the whole set has moments filled with n (its identity)."""
  os.makedirs(directory, exist_ok=True)
  n, shards = 0, {}
  for f, count in enumerate(counts):
    name = f"{f:05d}{ls.SHARD_SUFFIX}"
    writer = ls.ShardWriter(os.path.join(directory, name))
    for i in range(count):
      writer.write(ls.serialize_example(
          key=f"k{n}", caption=f"caption {n}", moments=np.full(moments_shape, n % 250, dtype),
          input_ids=np.full(MAX_LENGTH, n, np.int32), original_size=(n, n + 1),
          crop_offset=(0, n)))
      n += 1
    writer.commit()
    shards[name] = {"kept": count}
  manifest = dict(shards=shards, storage_dtype=np.dtype(dtype).name,
                  moments_shape=list(moments_shape), max_length=MAX_LENGTH, context_shape=None,
                  vae_fingerprint="v", tokenizer_fingerprint="t", num_examples=n)
  manifest.update(manifest_fields)
  ls.write_json(os.path.join(directory, ls.MANIFEST), manifest)
  return str(directory)


def reader_config(directory, **data):
  c = base_config()
  c.model.image_size = 16
  c.model.vae.block_out_channels = (8, 8, 8)  # f4: 16 px -> 4x4 latents
  c.model.text_encoder.max_length = MAX_LENGTH
  c.data.kind, c.data.latent_shards = "latent_shards", directory
  c.data.shuffle_buffer, c.data.files_per_window = 6, 2
  c.data.update(data)
  return c


def keys(batches):
  return [int(k[1:]) for b in batches for k in b["key"].astype(str)]


def metadata_reader(directory, local_batch, **kw):
  files, counts, manifest = ls.resolve_shards(directory)
  make = lambda start: ls.latent_dataset(
      files, counts, local_batch=local_batch, seed=kw.get("seed", 0), start_batch=start,
      moments_shape=manifest["moments_shape"], storage_dtype=manifest["storage_dtype"],
      max_length=MAX_LENGTH, with_metadata=True, shuffle_buffer=6, files_per_window=2)
  return shard_reading.ResumableBatches(make, identity={"seed": kw.get("seed", 0)})


def test_example_round_trip_in_both_dtypes(tmp_path):
  for dtype in (np.float16, ml_dtypes.bfloat16):
    moments = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(dtype)
    context = np.random.default_rng(1).standard_normal((MAX_LENGTH, 4)).astype(np.float16)
    record = ls.parse_example(ls.serialize_example(
        key="a/b", caption="ünïcode", moments=moments, input_ids=np.arange(MAX_LENGTH),
        original_size=(480, 640), crop_offset=(3, 4), context=context))
    assert record["moments"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(record["moments"], moments)
    np.testing.assert_array_equal(record["context"], context)
    assert (record["key"], record["caption"]) == ("a/b", "ünïcode")
    assert record["original_size"] == (480, 640) and record["crop_offset"] == (3, 4)
  directory = write_latent_shards(tmp_path / "bf16", dtype=ml_dtypes.bfloat16)
  batch = next(metadata_reader(directory, 4))
  assert batch["moments"].dtype == np.dtype(ml_dtypes.bfloat16)
  assert batch["moments"].shape == (4, 4, 4, 8) and batch["input_ids"].dtype == np.int32
  np.testing.assert_array_equal(batch["moments"][:, 0, 0, 0].astype(np.float32), keys([batch]))


def test_each_epoch_is_a_seeded_permutation(tmp_path):
  directory = write_latent_shards(tmp_path / "d")
  total = sum(COUNTS)
  it = metadata_reader(directory, 4)
  stream = keys([next(it) for _ in range(3 * total // 4)])  # three epochs
  epochs = [stream[i * total:(i + 1) * total] for i in range(3)]
  assert all(sorted(e) == list(range(total)) for e in epochs)
  assert epochs[0] != epochs[1]  # reshuffled every epoch
  again = metadata_reader(directory, 4)
  assert keys([next(again) for _ in range(6)]) == stream[:24]
  other = metadata_reader(directory, 4, seed=1)
  assert keys([next(other) for _ in range(6)]) != stream[:24]


def test_resume_at_any_position_sees_the_same_batches(tmp_path):
  directory = write_latent_shards(tmp_path / "d")
  reference = metadata_reader(directory, 5)
  stream = [next(reference) for _ in range(14)]  # batches straddle windows and epochs
  for position in (1, 2, 4, 5, 9, 12):
    resumed = metadata_reader(directory, 5)
    resumed.set_state(json.loads(json.dumps(dict(reference.get_state(), batches=position))))
    for want in stream[position:position + 2]:
      got = next(resumed)
      assert list(got["key"]) == list(want["key"])
      np.testing.assert_array_equal(got["moments"], want["moments"])
    assert resumed.get_state()["batches"] == position + 2


def test_two_hosts_read_disjoint_examples_covering_the_data(tmp_path):
  directory = write_latent_shards(tmp_path / "d")
  c = reader_config(directory)
  seen = []
  for host in (0, 1):
    it = ls.training_reader(c, 2, process_index=host, process_count=2)
    host_total = sum(COUNTS[host::2])
    ids = [int(row[0]) for _ in range(host_total) for row in next(it)["input_ids"]]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == host_total  # one host epoch
    seen.append(set(ids))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(sum(COUNTS)))
  state = it.get_state()
  assert state["process_count"] == 2 and state["global_batch"] == 2
  with pytest.raises(ValueError, match="global_batch"):
    ls.training_reader(c, 4, process_index=0, process_count=2).set_state(state)


def test_compatibility_checks(tmp_path):
  from latent_diffusion_jax.data.pre_encode import fingerprint
  from latent_diffusion_jax.data.tokenizers import build_word_tokenizer, load_tokenizer
  tok = load_tokenizer(build_word_tokenizer(shapes.vocabulary(), str(tmp_path / "tok"), MAX_LENGTH))
  vae_params = {"w": np.ones(3, np.float32)}
  directory = write_latent_shards(tmp_path / "d", vae_fingerprint=fingerprint(vae_params),
                                  tokenizer_fingerprint=ls.tokenizer_fingerprint(tok))
  ok = reader_config(directory)
  assert set(next(ls.training_reader(ok, 4, tokenizer=tok, vae_params=vae_params))) == {
      "moments", "input_ids"}
  cases = [
      (dict(), {"w": np.zeros(3, np.float32)}, "another VAE"),
      (dict(model_size=32), None, "moments"),
      (dict(max_length=8), None, "max_length"),
      (dict(use_text_embeddings=True), None, "store_text_embeddings"),
  ]
  for change, params, message in cases:
    c = reader_config(directory)
    c.model.image_size = change.pop("model_size", 16)
    c.model.text_encoder.max_length = change.pop("max_length", MAX_LENGTH)
    c.data.update(change)
    with pytest.raises(ValueError, match=message):
      ls.training_reader(c, 4, tokenizer=tok, vae_params=params or vae_params)
  unchecked = reader_config(directory, check_vae_fingerprint=False)
  ls.training_reader(unchecked, 4, tokenizer=tok, vae_params={"w": np.zeros(3, np.float32)})
  with pytest.raises(FileNotFoundError, match="manifest"):
    os.remove(os.path.join(directory, ls.MANIFEST))
    ls.training_reader(ok, 4)


def test_train_two_steps_from_latent_shards(tmp_path):
  from latent_diffusion_jax.data.tokenizers import build_word_tokenizer, load_tokenizer
  from latent_diffusion_jax.training import driver
  c = load_config_file(os.path.join(ROOT, "configs/shapes_ldm.py:tiny"))
  tok = load_tokenizer(build_word_tokenizer(shapes.vocabulary(), str(tmp_path / "tok"),
                                            c.model.text_encoder.max_length))
  # shapes_ldm: 32 px through an f4 VAE with 4 latent channels.
  directory = write_latent_shards(tmp_path / "latents", counts=(9, 7, 8), moments_shape=(8, 8, 8),
                                  tokenizer_fingerprint=ls.tokenizer_fingerprint(tok))
  c.data.kind, c.data.latent_shards = "latent_shards", directory
  c.data.check_vae_fingerprint = False  # synthetic moments, random VAE
  # Compiles and the checkpoint, not the data path, take the time here: the networks shrink to
  # the fewest ops that still condition on the stored token ids.
  c.model.latent_scale_factor = 0.5
  c.model.unet.update(block_out_channels=(16, 32), attention_levels=(True, False), num_heads=2,
                      norm_num_groups=8, mid_block_attention=False, cross_attention_dim=16)
  c.model.vae.update(block_out_channels=(8, 8, 8), norm_num_groups=4, mid_block_attention=False)
  c.model.text_encoder.ldm.update(width=16, depth=1, heads=2, head_dim=8)
  c.training.sample_every, c.training.checkpoint_every = 0, 2
  c.optimizer.ema_decay = 0.0
  # Threefry makes XLA compile the random initializers about 4x slower on CPU; the data path does
  # not care which PRNG the model uses.
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "unsafe_rbg")
  try:
    result = driver.train(c, str(tmp_path / "work"))
  finally:
    jax.config.update("jax_default_prng_impl", previous)
  assert result["step"] == 2 and np.isfinite(result["last_metrics"]["loss"])
  data_state = glob.glob(str(tmp_path / "work/checkpoints/2/data/*"))
  saved = [json.load(open(p)) for p in data_state if not p.endswith(".txt")]
  assert saved and saved[0]["batches"] == 2 and saved[0]["kind"] == "latent_shards"
