"""Aspect-ratio buckets end to end: bucket choice and crop geometry, the encode's per-bucket shards,
the one-bucket-per-global-batch reader (deterministic, exactly resumable, the same on every host),
one train-step compilation per bucket shape, sampling at other sizes, and the errors.

Slow: encode -> train -> sample with two buckets in this process, and a two-process train.py run on
bucketed latent shards stopped mid-way and resumed, equal to an uninterrupted one."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion_jax.core.config import base_config, load_config_file
from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.data import buckets as buckets_lib
from latent_diffusion_jax.data import bucketed_shards, encoder_job, latent_shards as ls
from latent_diffusion_jax.data import webdataset as wds
from latent_diffusion_jax.data.image_decode import preprocess_image
from test_webdataset import image_bytes, sample, write_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LENGTH = 12
# configs/shapes_ldm.py:tiny shrunk as in test_latent_shards: f4 VAE, 2-level UNet (total 8).
BUCKETS = ((32, 32), (24, 40))
TINY_NETS = dict(
    unet=dict(block_out_channels=(16, 32), attention_levels=(True, False), num_heads=2,
              norm_num_groups=8, mid_block_attention=False, cross_attention_dim=16),
    vae=dict(block_out_channels=(8, 8, 8), norm_num_groups=4, mid_block_attention=False))


# ----------------------------------------------------------------------------- bucket geometry

def test_nearest_bucket_by_log_aspect_with_ties_to_the_first_listed():
  buckets = ((256, 256), (192, 320), (320, 192), (128, 512))
  assert buckets_lib.nearest_bucket(1000, 1000, buckets) == 0
  assert buckets_lib.nearest_bucket(600, 1000, buckets) == 1    # 5:3 landscape
  assert buckets_lib.nearest_bucket(1000, 600, buckets) == 2    # portrait
  assert buckets_lib.nearest_bucket(100, 1000, buckets) == 3    # very wide -> 1:4
  # 16:9 (1.78) lies between 5:3 (1.67) and 4:1 in log space: nearer 5:3.
  assert buckets_lib.nearest_bucket(900, 1600, buckets) == 1
  # Exactly between 1:1 and 4:1 in log space (2:1): a tie, the first listed wins either way round.
  assert buckets_lib.nearest_bucket(100, 200, ((64, 64), (32, 128))) == 0
  assert buckets_lib.nearest_bucket(100, 200, ((32, 128), (64, 64))) == 0
  # Portrait and landscape mirror images tie for a square image: the first listed.
  assert buckets_lib.nearest_bucket(50, 50, ((192, 320), (320, 192))) == 0
  assert buckets_lib.nearest_bucket(50, 50, ((320, 192), (192, 320))) == 0


def test_cover_resize_and_center_crop_geometry():
  assert buckets_lib.cover_size(600, 1000, 192, 320) == (192, 320)  # same aspect: exact fit
  assert buckets_lib.cover_size(900, 1600, 192, 320) == (192, 341)  # height binds, width spills
  assert buckets_lib.cover_size(1000, 600, 192, 320) == (533, 320)  # width binds
  # The square case is the old short-side resize.
  from latent_diffusion_jax.data.image_decode import resized_size
  assert resized_size(240, 400, 16) == buckets_lib.cover_size(240, 400, 16, 16) == (16, 27)
  # A 64x40 (w x h) image: aspect 1.6, nearest the 40x24 landscape bucket (1.67).
  out = preprocess_image(image_bytes(size=(64, 40), seed=3), resolution=0, buckets=BUCKETS)
  assert out.bucket == 1 and out.pixels.shape == (24, 40, 3)
  # Cover: scale max(24/40, 40/64) = 0.625 -> 25 rows x 40 columns; the center 24 rows start at 0.
  assert out.crop_offset == (0, 0)
  tall = preprocess_image(image_bytes(size=(30, 60), seed=4), resolution=0, buckets=BUCKETS)
  assert tall.bucket == 0 and tall.pixels.shape == (32, 32, 3)
  assert tall.crop_offset == (16, 0)  # 30x60 -> 32x64 (w x h): rows 16..47 are the center
  # The crop equals resizing the whole image and cutting the bucket out of its center.
  from PIL import Image
  import io
  img = Image.open(io.BytesIO(image_bytes(size=(30, 60), seed=4))).convert("RGB")
  want = np.asarray(img.resize((32, 64), Image.BICUBIC))[16:48]
  np.testing.assert_array_equal(tall.pixels, want)


def test_bucket_sizes_must_divide_the_downsampling():
  c = base_config()  # SD: f8 VAE, 4-level UNet: sides must be multiples of 64
  c.data.buckets = ((512, 512), (384, 640))
  assert buckets_lib.check_buckets(c) == ((512, 512), (384, 640))
  c.data.buckets = ((512, 512), (388, 640))
  with pytest.raises(UserInputError, match=r"\(388, 640\).*height 388.*downsampling factor 8"):
    buckets_lib.check_buckets(c)
  c.data.buckets = ((512, 512), (392, 640))  # divides 8, but 49 latent pixels do not divide 8
  with pytest.raises(UserInputError, match=r"\(392, 640\).*UNet's downsampling 8.*multiple of 64"):
    buckets_lib.check_buckets(c)
  c.data.buckets = ((512, 512), (512, 512))
  with pytest.raises(UserInputError, match="twice"):
    buckets_lib.check_buckets(c)
  c.data.buckets = ((512,),)
  with pytest.raises(UserInputError, match="pair"):
    buckets_lib.check_buckets(c)
  # Stage 2 takes buckets only from bucketed latent shards.
  from latent_diffusion_jax.training.stages.diffusion import _check_buckets
  c.data.buckets, c.data.kind = ((512, 512),), "shapes"
  with pytest.raises(UserInputError, match="data.buckets needs data.kind='latent_shards'"):
    _check_buckets(c)


# ----------------------------------------------------------------------------- the reader

def write_bucketed_shards(directory, files_per_bucket=((5, 4, 3), (6, 0, 5)), buckets=BUCKETS,
                          factor=4, channels=8):
  """Synthetic bucketed latent shards: example n (counted over all files) has moments filled with
  n % 250 and key f"k{n}"; bucket k's files are NAME.b{k}.tfrecord."""
  os.makedirs(directory, exist_ok=True)
  n, shards = 0, {}
  for k, counts in enumerate(files_per_bucket):
    shape = buckets_lib.latent_shape(buckets[k], factor, channels)
    for f, count in enumerate(counts):
      name = encoder_job.bucket_output_name(f"{f:05d}{ls.SHARD_SUFFIX}", k)
      writer = ls.ShardWriter(os.path.join(directory, name))
      for _ in range(count):
        writer.write(ls.serialize_example(
            key=f"k{n}", caption=f"caption {n}", moments=np.full(shape, n % 250, np.float16),
            input_ids=np.full(MAX_LENGTH, n, np.int32), original_size=(n, n + 1),
            crop_offset=(0, n)))
        n += 1
      writer.commit()
      shards[name] = {"kept": count, "bucket": k}
  manifest = dict(
      shards=shards, storage_dtype="float16", max_length=MAX_LENGTH, context_shape=None,
      vae_fingerprint="v", tokenizer_fingerprint="t", num_examples=n,
      buckets=[{"size": list(b), "moments_shape": list(buckets_lib.latent_shape(b, factor, channels))}
               for b in buckets])
  ls.write_json(os.path.join(directory, ls.MANIFEST), manifest)
  return str(directory)


def reader_config(directory, **data):
  c = base_config()
  c.model.image_size = 32
  c.model.vae.block_out_channels = (8, 8, 8)  # f4
  c.model.unet.block_out_channels = (16, 32)  # x2: sides multiples of 8
  c.model.text_encoder.max_length = MAX_LENGTH
  c.data.kind, c.data.latent_shards, c.data.buckets = "latent_shards", directory, BUCKETS
  c.data.shuffle_buffer, c.data.files_per_window = 6, 2
  c.data.update(data)
  return c


def _read(reader, steps):
  out = []
  for _ in range(steps):
    batch = next(reader)
    out.append((batch["moments"].shape, [int(row[0]) for row in batch["input_ids"]]))
  return out


def test_reader_one_shape_per_batch_deterministic_and_proportional(tmp_path):
  directory = write_bucketed_shards(tmp_path / "d")
  c = reader_config(directory)
  reader = ls.training_reader(c, 4, process_index=0, process_count=1)
  plan = reader.bucket_plan
  # 12 and 11 examples: 3 and 2 batches of 4 per schedule epoch.
  assert plan.used == [0, 1] and list(plan.schedule.batches_per_epoch) == [3, 2]
  stream = _read(reader, 15)  # three schedule epochs
  shapes = {(4, 8, 8, 8): 0, (4, 6, 10, 8): 1}
  buckets = [shapes[s] for s, _ in stream]
  assert [buckets[i:i + 5].count(0) for i in (0, 5, 10)] == [3, 3, 3]
  assert buckets == [plan.schedule.bucket_of(s) for s in range(15)]
  assert buckets[:5] != buckets[5:10] or buckets[5:10] != buckets[10:]  # reshuffled per epoch
  for (_, ids), k in zip(stream, buckets):  # examples 0..11 are bucket 0's, 12..22 bucket 1's
    assert all((i < 12) == (k == 0) for i in ids)
  # Within a bucket's stream nothing repeats before all its examples have been seen.
  first_ids = [i for (_, ids), k in zip(stream, buckets) if k == 0 for i in ids][:12]
  assert sorted(first_ids) == list(range(12))
  again = ls.training_reader(c, 4, process_index=0, process_count=1)
  assert _read(again, 15) == stream
  c1 = reader_config(directory)
  c1.seed = 1
  assert _read(ls.training_reader(c1, 4, process_index=0, process_count=1), 15) != stream


def test_reader_resumes_exactly_from_a_saved_position(tmp_path):
  directory = write_bucketed_shards(tmp_path / "d")
  c = reader_config(directory)
  reference = ls.training_reader(c, 4, process_index=0, process_count=1)
  stream = _read(reference, 14)
  for position in (1, 3, 5, 7, 11):
    first = ls.training_reader(c, 4, process_index=0, process_count=1)
    _read(first, position)
    state = json.loads(json.dumps(first.get_state()))  # as the checkpoint stores it
    assert state["batches"] == position and state["buckets"] == [list(b) for b in BUCKETS]
    resumed = ls.training_reader(c, 4, process_index=0, process_count=1)
    resumed.set_state(state)
    assert _read(resumed, 3) == stream[position:position + 3], position
  with pytest.raises(ValueError, match="buckets"):
    ls.training_reader(c, 4, process_index=0, process_count=1).set_state(
        dict(state, buckets=[[32, 32]]))


def test_two_hosts_agree_on_every_batch_bucket_and_split_it(tmp_path):
  directory = write_bucketed_shards(tmp_path / "d", files_per_bucket=((5, 4, 3, 2), (6, 0, 5, 4)))
  c = reader_config(directory)
  hosts = [ls.training_reader(c, 4, process_index=p, process_count=2) for p in (0, 1)]
  streams = [_read(h, 10) for h in hosts]
  for (shape0, ids0), (shape1, ids1) in zip(*streams):
    assert shape0 == shape1 and shape0[0] == 2  # the same bucket, 2 rows each
    assert not set(ids0) & set(ids1)
  # Host 0 reads files 0 and 2 of each bucket (the non-empty ones split in turn), host 1 the rest.
  host0 = {i for _, ids in streams[0] for i in ids}
  assert host0 <= set(range(0, 5)) | set(range(9, 12)) | set(range(14, 20)) | set(range(25, 29))
  assert {i for _, ids in streams[1] for i in ids} <= (
      set(range(5, 9)) | set(range(12, 14)) | set(range(20, 25)))
  assert hosts[0].get_state() == hosts[1].get_state()


def test_buckets_too_small_for_a_global_batch_are_left_out(tmp_path):
  directory = write_bucketed_shards(tmp_path / "d", files_per_bucket=((5, 4, 3), (2, 1, 0)))
  reader = ls.training_reader(reader_config(directory), 4, process_index=0, process_count=1)
  assert reader.bucket_plan.used == [0]
  assert {s for s, _ in _read(reader, 4)} == {(4, 8, 8, 8)}
  with pytest.raises(UserInputError, match="No bucket"):
    ls.training_reader(reader_config(directory), 16, process_index=0, process_count=1)
  with pytest.raises(UserInputError, match="encoded with buckets"):
    ls.training_reader(reader_config(directory, buckets=((24, 40), (32, 32))), 4)


def test_schedule_counts_match_the_stream():
  schedule = bucketed_shards.BucketSchedule([3, 0, 2], seed=5)
  seq = [schedule.bucket_of(s) for s in range(23)]
  assert 1 not in seq
  for s in range(23):
    np.testing.assert_array_equal(schedule.consumed(s), np.bincount(seq[:s], minlength=3))


# ----------------------------------------------------------------------------- compilation

def test_train_step_compiles_once_per_batch_shape():
  from latent_diffusion_jax.core import parallel
  from latent_diffusion_jax.training import startup
  mesh = parallel.create_mesh((-1, 1, 1))
  traces = []

  def step(state, batch):
    traces.append(batch["moments"].shape)
    return state + batch["moments"].mean(), {"loss": batch["moments"].sum()}

  state = jax.device_put(jnp.zeros(()), startup.replicated(mesh))
  shardings = startup.replicated(mesh)
  batch = lambda h, w: parallel.global_batch({"moments": np.ones((8, h, w, 8), np.float32)}, mesh)
  fn = startup.compile_step(step, state, shardings, batch(8, 8), (), mesh)
  for h, w in [(8, 8), (6, 10), (8, 8), (6, 10), (6, 10), (8, 8)]:
    state, _ = fn(state, batch(h, w))
  assert fn.num_compilations == len(traces) == 2
  assert float(state) == pytest.approx(6.0)


# ----------------------------------------------------------------------------- sampling

def test_sampling_size_must_divide_the_total_downsampling(tmp_path):
  from latent_diffusion_jax.sampling.generation import generate, latent_shape, total_downsampling
  from tiny_bundles import tiny_bundle
  bundle = tiny_bundle(str(tmp_path), "sd1")  # f2 VAE, 2-level UNet: multiples of 4
  assert total_downsampling(bundle) == 4
  assert latent_shape(bundle, 12, 20) == (6, 10, 4)
  assert latent_shape(bundle) == (8, 8, 4)  # the square image_size
  with pytest.raises(UserInputError, match=r"height=14 is not a positive multiple of 4.*factor 2"):
    generate(bundle, ["a red circle"], height=14, width=16, num_steps=1)
  with pytest.raises(UserInputError, match="width=0"):
    generate(bundle, ["a red circle"], height=16, width=0, num_steps=1)


# ----------------------------------------------------------------------------- encode

def _encode_config(tmp_path):
  c = load_config_file(os.path.join(ROOT, "configs/shapes_ldm.py:tiny"))
  c.model.unet.update(TINY_NETS["unet"])
  c.model.vae.update(TINY_NETS["vae"])
  c.model.text_encoder.ldm.update(width=16, depth=1, heads=2, head_dim=8)
  c.data.buckets = BUCKETS
  c.encode.batch_size = 8
  c.model.latent_scale_factor = 0.5
  return c


def _images():
  """8 landscape (64x40 w x h, aspect 1.6: bucket 1) and 8 near-square (36x40, 0.9: bucket 0)."""
  rng_sizes = [(64, 40)] * 8 + [(36, 40)] * 8
  return {f"s{i:02d}": sample(image_bytes(size=size, seed=100 + i))
          for i, size in enumerate(rng_sizes)}


@pytest.fixture(scope="module")
def fast_prng():
  """Threefry makes XLA compile random initializers about 4x slower on CPU (see
  test_latent_shards); the encode and the run below both draw their random VAE with this one, so
  its fingerprint still matches."""
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "unsafe_rbg")
  yield
  jax.config.update("jax_default_prng_impl", previous)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, fast_prng):
  from latent_diffusion_jax.training import frozen
  tmp = tmp_path_factory.mktemp("buckets")
  inputs = tmp / "tars"
  inputs.mkdir()
  images = _images()
  keys = sorted(images)
  write_shard(inputs / "00000.tar", {k: images[k] for k in keys[::2]})
  write_shard(inputs / "00001.tar", {k: images[k] for k in keys[1::2]})
  c = _encode_config(tmp)
  encoder, tokenizer, scale = frozen.build_encoder(c)
  out = tmp / "latents"
  summary = encoder_job.encode_shards(c, str(inputs / "*.tar"), str(out), encoder=encoder,
                                      tokenizer=tokenizer, scale_factor=scale)
  return dict(config=c, out=out, summary=summary, encoder=encoder, tmp=tmp, images=images,
              tokenizer=tokenizer)


def test_encode_writes_one_shard_per_input_and_bucket(encoded):
  out = encoded["out"]
  names = sorted(n for n in os.listdir(out) if n.endswith(ls.SHARD_SUFFIX))
  assert names == ["00000.b0.tfrecord", "00000.b1.tfrecord", "00001.b0.tfrecord",
                   "00001.b1.tfrecord"]
  manifest = ls.read_json(str(out / ls.MANIFEST))
  assert manifest["buckets"] == [{"size": [32, 32], "moments_shape": [8, 8, 8]},
                                 {"size": [24, 40], "moments_shape": [6, 10, 8]}]
  assert "moments_shape" not in manifest and manifest["preprocessing"]["buckets"] == [[32, 32],
                                                                                    [24, 40]]
  assert manifest["num_examples"] == 16 and manifest["num_shards"] == 4
  for name in names:
    bucket = int(name.split(".")[1][1:])
    records = ls.read_shard(str(out / name))
    assert manifest["shards"][name]["bucket"] == bucket
    assert manifest["shards"][name]["kept"] == len(records) == 4
    for r in records:
      assert r["moments"].shape == tuple(manifest["buckets"][bucket]["moments_shape"])
      # Each record is the encoding of its image cropped to its bucket.
      data = encoded["images"][r["key"]]["png"]
      eager = preprocess_image(data, resolution=0, buckets=BUCKETS, key=r["key"])
      assert eager.bucket == bucket and r["crop_offset"] == eager.crop_offset
  # One encoder compilation per bucket shape.
  assert encoded["encoder"]._encode._cache_size() == 2
  # A rerun finds every input finished (all its bucket shards exist) and encodes nothing.
  c = encoded["config"]
  again = encoder_job.encode_shards(c, str(encoded["tmp"] / "tars" / "*.tar"), str(out),
                                    encoder=encoded["encoder"], tokenizer=encoded["tokenizer"])
  assert again["kept"] == 16 and encoded["encoder"]._encode._cache_size() == 2


def test_encode_refuses_a_bucket_the_first_stage_cannot_take(encoded, tmp_path):
  c = _encode_config(tmp_path)
  c.data.buckets = ((32, 32), (26, 40))
  with pytest.raises(UserInputError, match=r"\(26, 40\).*factor 4"):
    encoder_job.encode_shards(c, str(encoded["tmp"] / "tars" / "*.tar"), str(tmp_path / "x"),
                              encoder=encoded["encoder"], tokenizer=encoded["tokenizer"])


@pytest.mark.slow
def test_encode_train_sample_with_two_buckets(encoded, tmp_path):
  from latent_diffusion_jax.artifacts.workdir import load_bundle
  from latent_diffusion_jax.sampling.run import run_sampling
  from latent_diffusion_jax.training import driver
  c = encoded["config"]
  c.data.kind, c.data.latent_shards = "latent_shards", str(encoded["out"])
  c.training.num_steps, c.training.checkpoint_every = 4, 4
  c.training.sample_every = 0
  c.optimizer.ema_decay = 0.0
  # The run's random VAE (frozen.vae="") is the encode's: the same seed, PRNG and fingerprint.
  result = driver.train(c, str(tmp_path / "work"))
  assert result["step"] == 4 and np.isfinite(result["last_metrics"]["loss"])
  # 8 and 8 examples, global batch 8: one batch of each bucket per schedule epoch, so both
  # shapes ran, twice each, and compiled once each.
  assert result["step_compilations"] == 2
  assert load_bundle(str(tmp_path / "work")).image_size == 32  # trained "at" the square size
  # sample.py at the landscape bucket's size.
  from absl.testing import flagsaver
  from PIL import Image
  from test_sampling import load_sample_cli
  cli = load_sample_cli()
  out = tmp_path / "samples"
  with flagsaver.flagsaver():
    cli.flags.FLAGS(["sample.py", "--checkpoint", str(tmp_path / "work"), "--prompt",
                     "a red circle", "--steps", "2", "--height", "24", "--width", "40",
                     "--out", str(out)])
    cli.main(["sample.py"])
  with open(out / "settings.json") as f:
    settings = json.load(f)
  assert (settings["height"], settings["width"]) == (24, 40)
  assert np.asarray(Image.open(out / settings["files"][0])).shape == (24, 40, 3)
  with pytest.raises(UserInputError, match="height=20 is not a positive multiple of 8"):
    run_sampling(prompts=["a red circle"], out_dir=str(tmp_path / "bad"),
                 source=str(tmp_path / "work"),
                 num_steps=2, height=20, width=40, print_fn=lambda _: None)


# ----------------------------------------------------------------------------- two processes

TWO_PROCESS_ARGS = (
    "--config", "configs/shapes_ldm.py:tiny", "--config.frozen.vae=",
    "--config.training.log_every=1", "--config.training.sample_every=0",
    "--config.optimizer.schedule=constant", "--config.model.latent_scale_factor=0.5",
    "--config.data.kind=latent_shards", "--config.data.check_vae_fingerprint=False",
    "--config.data.buckets=((32,32),(24,40))", "--config.data.shuffle_buffer=8",
    "--config.data.files_per_window=2",
    # bench/chaos.py's "minimal" networks: conv-only UNet (factor 1) without text.
    "--config.model.text_encoder.kind=none", "--config.model.text_encoder.trainable=False",
    "--config.model.unet.block_out_channels=(16,)", "--config.model.unet.attention_levels=(False,)",
    "--config.model.unet.mid_block_attention=False", "--config.model.unet.norm_num_groups=8",
    "--config.model.vae.block_out_channels=(8,8,8)", "--config.model.vae.norm_num_groups=8",
    "--config.model.vae.mid_block_attention=False")
_LOSS = re.compile(r"\] \[(\d+)\] .*?\bloss=([-+.\deE]+)")


@pytest.mark.slow
def test_two_processes_on_bucketed_shards_resume_exactly(tmp_path):
  import concurrent.futures
  from test_multihost import _two_processes  # puts bench/ (chaos.py) on sys.path
  import chaos
  data = write_bucketed_shards(tmp_path / "latents",
                               files_per_bucket=((9, 7, 8, 6), (8, 9, 0, 7)))
  args = [*TWO_PROCESS_ARGS, f"--config.data.latent_shards={data}"]
  steps = lambda n, every: [f"--config.training.num_steps={n}",
                            f"--config.training.checkpoint_every={every}"]
  full, parts = str(tmp_path / "full"), str(tmp_path / "parts")
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    reference = pool.submit(_two_processes, full, args + steps(6, 6), full)
    first = _two_processes(parts, args + steps(3, 3), parts + ".first")
    logs = reference.result()
  second = _two_processes(parts, args + steps(6, 3), parts + ".second")
  assert "Resuming from" in second[0] and "step 3" in second[0]
  losses = lambda text: {int(s): v for s, v in _LOSS.findall(text)}
  want = losses(logs[0])
  assert sorted(want) == list(range(1, 7))
  assert {**losses(first[0]), **losses(second[0])} == want  # logged values, printed alike
  # Both bucket shapes ran and each compiled once, on each process.
  for text in logs:
    assert text.count("Train step compiled for batch shapes") == 2, text[-3000:]
  a, b = chaos.read_checkpoint(full, 6), chaos.read_checkpoint(parts, 6)
  assert a["data"] == b["data"] and a["data"]["batches"] == 6
  assert chaos.bitwise_differences(a, b) == []
