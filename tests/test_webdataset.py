"""WebDataset tar reading: patterns, grouping, the kept-vs-skipped policy for bad inputs, image
preprocessing (eagerly and inside tf.data), caption tokenization, the raw-shard training reader.

Also the sample factory that test_encode.py builds its shards from.
"""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from latent_diffusion_jax.data import image_decode, shard_reading, webdataset as wds
from latent_diffusion_jax.data.image_decode import SkipSample, preprocess_image

RESOLUTION = 16
CAPTION = "a red circle in the top left"
GOOD_META = {"similarity": 0.35, "pwatermark": 0.1, "punsafe": 0.05}


def image_bytes(mode="RGB", size=(24, 20), fmt="PNG", seed=0) -> bytes:
  """An encoded random image of PIL `mode`, `size` = (width, height)."""
  rng = np.random.default_rng(seed)
  w, h = size
  if mode == "I;16":
    img = Image.fromarray(rng.integers(0, 65535, (h, w)).astype(np.uint16))
  else:
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    if mode == "P":
      img.info["transparency"] = 0
  buf = io.BytesIO()
  img.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
  return buf.getvalue()


def sample(image=None, caption=CAPTION, meta=GOOD_META, ext="png"):
  files = {}
  if image is not None:
    files[ext] = image
  if caption is not None:
    files["txt"] = caption.encode()
  if meta is not None:
    files["json"] = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
  return files


def kept_samples():
  """Samples every configuration keeps: odd pixel formats are converted to RGB8."""
  jpeg = image_bytes("RGB", (40, 24), "JPEG", seed=1)
  return {
      "rgb_jpeg": sample(jpeg, meta=dict(GOOD_META, original_width=400, original_height=240),
                         ext="jpg"),
      "gray": sample(image_bytes("L", seed=2)),
      "rgba": sample(image_bytes("RGBA", seed=3)),
      "cmyk": sample(image_bytes("CMYK", fmt="JPEG", seed=4), ext="jpg"),
      "sixteen_bit": sample(image_bytes("I;16", seed=5)),
      "palette_alpha": sample(image_bytes("P", seed=6)),
      "webp": sample(image_bytes("RGB", fmt="WEBP", seed=7), ext="webp"),
      "long_caption": sample(image_bytes(seed=8), caption=" ".join(["red circle"] * 12)),
  }


def broken_samples():
  """(samples, reason per key) for bad inputs skipped whatever the filters."""
  truncated = image_bytes("RGB", (40, 24), "JPEG", seed=9)
  samples = {
      "garbage": sample(b"\x00not an image" * 10, ext="jpg"),
      "truncated_img": sample(truncated[:len(truncated) // 2], ext="jpg"),
      "zero_bytes": sample(b""),
      "one_pixel": sample(image_bytes(size=(1, 1))),
      "no_caption": sample(image_bytes(seed=10), caption=None),
      "blank_caption": sample(image_bytes(seed=11), caption="  \n"),
      "no_image": sample(None),
  }
  reasons = {"garbage": "corrupt_image", "truncated_img": "truncated_image",
             "zero_bytes": "empty_image", "one_pixel": "degenerate_image",
             "no_caption": "missing_caption", "blank_caption": "empty_caption",
             "no_image": "missing_image"}
  return samples, reasons


def write_shard(path, samples):
  wds.write_tar_shard(path, sorted(samples.items()))
  return str(path)


def truncate_file(path, fraction=0.6):
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:int(len(data) * fraction)])


def test_brace_and_glob_expansion(tmp_path):
  assert shard_reading.expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
  assert shard_reading.expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
  assert shard_reading.expand_braces("x{9..11}") == ["x9", "x10", "x11"]
  for name in ("b.tar", "a.tar", "c.txt"):
    (tmp_path / name).write_bytes(b"")
  got = shard_reading.expand_patterns([str(tmp_path / "*.tar"), str(tmp_path / "a.tar"),
                             str(tmp_path / "missing.tar")])
  assert got == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar"), str(tmp_path / "missing.tar")]
  with pytest.raises(FileNotFoundError, match="matched no file"):
    shard_reading.expand_patterns(str(tmp_path / "*.zip"))


@pytest.mark.parametrize("name", sorted(kept_samples()))
def test_odd_formats_become_rgb8_crops(name):
  files = kept_samples()[name]
  data = next(v for k, v in files.items() if k in wds.IMAGE_EXTENSIONS)
  out = preprocess_image(data, resolution=RESOLUTION, key=name)
  assert out.pixels.shape == (RESOLUTION, RESOLUTION, 3) and out.pixels.dtype == np.uint8
  if name == "rgba":
    # Alpha is composited onto white: a transparent pixel becomes white, not its stored colour.
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    white = preprocess_image(_png(rgba), resolution=RESOLUTION).pixels
    assert (white == 255).all()
  if name == "sixteen_bit":
    assert out.pixels.std() > 20  # scaled, not clipped to white
    assert (out.pixels[..., 0] == out.pixels[..., 1]).all()


def _png(img):
  buf = io.BytesIO()
  img.save(buf, "PNG")
  return buf.getvalue()


@pytest.mark.parametrize("name", sorted(broken_samples()[1]))
def test_bad_images_raise_their_reason(name):
  samples, reasons = broken_samples()
  files = samples[name]
  data = next((v for k, v in files.items() if k in wds.IMAGE_EXTENSIONS), None)
  if reasons[name].endswith("image") and data is not None:
    with pytest.raises(SkipSample) as e:
      preprocess_image(data, resolution=RESOLUTION)
    assert e.value.reason == reasons[name]
  else:
    prep = wds.Preprocessing(resolution=RESOLUTION)
    assert wds.check_sample(name, files, prep)[0] == reasons[name]


def test_filters_and_crops():
  wide = image_bytes(size=(64, 16))
  with pytest.raises(SkipSample, match="aspect_ratio"):
    preprocess_image(wide, resolution=RESOLUTION, max_aspect_ratio=3.0)
  with pytest.raises(SkipSample, match="too_small"):
    preprocess_image(wide, resolution=RESOLUTION, min_size=20)
  centre = preprocess_image(wide, resolution=RESOLUTION)
  assert centre.original_size == (16, 64) and centre.crop_offset == (0, 24)
  a = preprocess_image(wide, resolution=RESOLUTION, crop="random", key="k", seed=1)
  b = preprocess_image(wide, resolution=RESOLUTION, crop="random", key="k", seed=1)
  offsets = {preprocess_image(wide, resolution=RESOLUTION, crop="random", key=f"k{i}").crop_offset
             for i in range(8)}
  assert a.crop_offset == b.crop_offset and len(offsets) > 1
  assert all(o[0] == 0 and 0 <= o[1] <= 48 for o in offsets)
  # Upscaling keeps the aspect ratio: 8x12 -> 16x24, centre crop at left 4.
  small = preprocess_image(image_bytes(size=(12, 8)), resolution=RESOLUTION)
  assert small.crop_offset == (0, 4)


def test_metadata_policy():
  strict = wds.Preprocessing(resolution=RESOLUTION, max_watermark=0.5, max_unsafe=0.5,
                             min_similarity=0.3)
  open_ = wds.Preprocessing(resolution=RESOLUTION)
  img = image_bytes()
  cases = {
      "watermark": dict(GOOD_META, pwatermark=0.9), "unsafe": dict(GOOD_META, punsafe=0.7),
      "low_similarity": dict(GOOD_META, similarity=0.1),
      "missing_metadata": {"similarity": 0.5, "pwatermark": 0.0},
  }
  for reason, meta in cases.items():
    assert wds.check_sample("k", sample(img, meta=meta), strict)[0] == reason
    assert wds.check_sample("k", sample(img, meta=meta), open_)[0] == ""
  # No json, or unparsable json: unknown metadata, kept unless a filter needs it.
  for files in (sample(img, meta=None), sample(img, meta=b"{not json")):
    assert wds.check_sample("k", files, open_)[0] == ""
    assert wds.check_sample("k", files, strict)[0] == "missing_metadata"
  status, _, _, caption, original = wds.check_sample(
      "k", sample(img, meta=dict(GOOD_META, original_width=640, original_height=480)), strict)
  assert (status, caption, original) == ("", CAPTION, (480, 640))
  # Class-conditional configs need no captions.
  no_text = wds.Preprocessing(resolution=RESOLUTION, require_caption=False)
  assert wds.check_sample("k", sample(img, caption=None), no_text)[0] == ""


def _shards(tmp_path):
  """Three shards plus a missing and a non-tar one; returns (paths, expected status per key)."""
  kept = kept_samples()
  broken, reasons = broken_samples()
  expected = {k: "" for k in kept}
  expected.update(reasons)
  paths = [write_shard(tmp_path / "00000.tar", kept), write_shard(tmp_path / "00001.tar", broken)]
  # A truncated tar: the samples before the cut are read, the one cut through is skipped.
  cut = {f"t{i}": sample(image_bytes(size=(40, 40), seed=20 + i)) for i in range(4)}
  paths.append(write_shard(tmp_path / "00002.tar", cut))
  truncate_file(paths[-1], 0.6)
  (tmp_path / "00004.tar").write_bytes(os.urandom(3000))
  paths += [str(tmp_path / "00003.tar"), str(tmp_path / "00004.tar")]
  return paths, expected


def test_tar_cut_at_a_member_boundary_is_detected(tmp_path):
  import tarfile
  path = write_shard(tmp_path / "cut.tar", {f"s{i}": sample(image_bytes(seed=i)) for i in range(3)})
  with tarfile.open(path) as tar:
    boundary = [m for m in tar.getmembers() if m.name.startswith("s2")][0].offset
  with open(path, "r+b") as f:
    f.truncate(boundary)  # s0, s1 whole; s2 and the end-of-archive marker gone
  got = [(key, error) for key, _, error in wds.iter_tar_samples(path)]
  # s1 was read whole but, with the archive cut right after it, may have lost members.
  assert got == [("s0", None), ("s1", "truncated_tar")]


def test_tf_data_reader_counts_every_record_and_matches_eager(tmp_path):
  paths, expected = _shards(tmp_path)
  prep = wds.Preprocessing(resolution=RESOLUTION)
  records = list(wds.read_samples(paths, prep, parallel_shards=3).as_numpy_iterator())
  ends = [r for r in records if r["status"] == wds.SHARD_END.encode()]
  assert sorted(r["shard"] for r in ends) == list(range(len(paths)))
  got = {r["key"].decode(): r["status"].decode() for r in records if r not in ends}
  for key, reason in expected.items():
    assert got.pop(key) == reason, key
  # Truncated tar: t0, t1 read whole, t2 cut through (skipped), t3 never reached.
  assert got.pop("t0") == got.pop("t1") == ""
  assert got.pop("t2") == "truncated_tar"
  assert got == {paths[3]: "unreadable_shard", paths[4]: "unreadable_shard"}
  # Inside tf.data the pixels equal the eager preprocessing of the same bytes.
  for r in records:
    if r["key"] == b"cmyk" or r["key"] == b"rgb_jpeg":
      files = kept_samples()[r["key"].decode()]
      eager = preprocess_image(files["jpg"], resolution=RESOLUTION, key=r["key"].decode())
      np.testing.assert_array_equal(r["pixels"], eager.pixels)
      expect_size = (240, 400) if r["key"] == b"rgb_jpeg" else eager.original_size
      assert tuple(r["original_size"]) == expect_size
      assert tuple(r["crop_offset"]) == eager.crop_offset


def test_tokenize_captions_truncates_long_ones(tmp_path):
  from latent_diffusion_jax.data import shapes
  from latent_diffusion_jax.data.tokenizers import build_word_tokenizer, load_tokenizer
  tok = load_tokenizer(build_word_tokenizer(shapes.vocabulary(), str(tmp_path / "tok"), 12))
  ids, too_long = wds.tokenize_captions(tok, [CAPTION, " ".join(["red"] * 20)], 12)
  assert ids.shape == (2, 12) and ids.dtype == np.int32 and list(too_long) == [False, True]
  assert ids[1, -1] == tok.eos_token_id and ids[1, 0] == tok.bos_token_id
  assert ids[0, 8] == tok.eos_token_id and (ids[0, 9:] == tok.pad_token_id).all()


def test_raw_shard_training_reader_resumes_exactly(tmp_path):
  from latent_diffusion_jax.core.config import base_config
  from latent_diffusion_jax.data import shapes
  from latent_diffusion_jax.data.tokenizers import build_word_tokenizer, load_tokenizer
  tok = load_tokenizer(build_word_tokenizer(shapes.vocabulary(), str(tmp_path / "tok"), 12))
  for i in range(2):
    write_shard(tmp_path / f"{i:05d}.tar",
                {f"s{i}_{j}": sample(image_bytes(seed=100 * i + j)) for j in range(5)})
  c = base_config()
  c.model.image_size, c.data.webdataset = RESOLUTION, str(tmp_path / "{00000..00001}.tar")
  c.model.text_encoder.max_length, c.data.shuffle_buffer = 12, 4

  def reader():
    return wds.training_reader(c, 4, tokenizer=tok, process_index=0, process_count=1)

  it = reader()
  batches = [next(it) for _ in range(5)]  # 20 images: 2 epochs of 10
  assert batches[0]["images"].shape == (4, RESOLUTION, RESOLUTION, 3)
  assert batches[0]["images"].dtype == np.uint8
  expected_ids = wds.tokenize_captions(tok, [CAPTION] * 4, 12)[0]
  np.testing.assert_array_equal(batches[0]["input_ids"], expected_ids)
  state = it.get_state()
  later = [next(it) for _ in range(2)]
  resumed = reader()
  resumed.set_state(json.loads(json.dumps(state)))
  for want in later:
    np.testing.assert_array_equal(next(resumed)["images"], want["images"])
  fresh = reader()
  np.testing.assert_array_equal(next(fresh)["images"], batches[0]["images"])
  with pytest.raises(ValueError, match="seed"):
    fresh.set_state(dict(state, seed=7))


def test_image_decode_documents_every_reason():
  doc = image_decode.__doc__ + wds.__doc__
  for reason in ("empty_image", "corrupt_image", "truncated_image", "image_too_large",
                 "degenerate_image", "too_small", "aspect_ratio", "unsupported_mode",
                 "unreadable_shard", "truncated_tar", "missing_image", "missing_caption",
                 "empty_caption", "missing_metadata", "watermark", "unsafe", "low_similarity"):
    assert reason in doc, reason


# ------------------------------------------------- stage 1 end to end on WebDataset shards


def _shapes_shard(path, split, count, size):
  """A tar shard of the first `count` embedded-dataset examples of `split` (PNG + caption)."""
  from latent_diffusion_jax.data import shapes
  images, captions, _ = shapes.generate_batch(0, count, split=split, image_size=size)
  write_shard(path, {f"{split}{i:04d}": sample(_png(Image.fromarray(images[i])), caption=captions[i])
                     for i in range(count)})
  return images


def _stage1_webdataset_config(tmp_path, size=16):
  from latent_diffusion_jax.core.config import load_config_file
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  c = load_config_file(os.path.join(root, "configs/shapes_autoencoder.py:tiny"))
  c.model.image_size = size
  c.model.vae.update(block_out_channels=(8, 16), norm_num_groups=4, mid_block_attention=False)
  c.autoencoder.update(disc_channels=8, disc_num_layers=1)
  c.data.kind = "webdataset"
  c.data.webdataset = str(tmp_path / "train" / "{00000..00001}.tar")
  c.data.shuffle_buffer = 16
  c.training.async_checkpointing = False
  return c


def test_stage1_on_webdataset_needs_held_out_shards(tmp_path):
  """Without data.eval_webdataset stage 1 stops before training, naming the key."""
  from latent_diffusion_jax.core.errors import UserInputError
  from latent_diffusion_jax.training import driver
  c = _stage1_webdataset_config(tmp_path)
  with pytest.raises(UserInputError, match="data.eval_webdataset"):
    driver.train(c, str(tmp_path / "work"))
  assert not os.path.exists(tmp_path / "work" / "checkpoints")


@pytest.mark.slow
def test_stage1_trains_and_evaluates_on_webdataset(tmp_path):
  """A 2-step stage-1 run through run_training on tar shards: its held-out evaluation (the hook
  and the final summary) and latent scale come from the data.eval_webdataset shards (the first
  data.num_test kept samples), never from the embedded dataset; stage 2 reads that scale."""
  import jax
  from latent_diffusion_jax.artifacts.workdir import STAGE1_SUMMARY, load_first_stage
  from latent_diffusion_jax.core import parallel
  from latent_diffusion_jax.data.batches import held_out_images
  from latent_diffusion_jax.training.reconstruction import ReconstructionEval
  from latent_diffusion_jax.training.run import run_training
  size = 16
  os.makedirs(tmp_path / "train")
  os.makedirs(tmp_path / "eval")
  for i in range(2):
    _shapes_shard(tmp_path / "train" / f"{i:05d}.tar", "train", 12, size)
  held = _shapes_shard(tmp_path / "eval" / "00000.tar", "test", 12, size)
  c = _stage1_webdataset_config(tmp_path, size)
  c.data.eval_webdataset = str(tmp_path / "eval" / "*.tar")
  c.data.num_test = 10
  c.training.sample_every = 1
  workdir = str(tmp_path / "work")
  result = run_training(c, workdir)
  assert result["step"] == 2 and not os.path.exists(os.path.join(workdir, "tfds"))
  np.testing.assert_array_equal(held_out_images(c, workdir), held[:10])
  with open(os.path.join(workdir, STAGE1_SUMMARY)) as f:
    summary = json.load(f)
  vae, params, scale = load_first_stage(workdir)
  assert scale == pytest.approx(summary["latent_scale_factor"])
  mesh = parallel.create_mesh((1, 1, 1), devices=jax.devices()[:1])
  with parallel.mesh_context(mesh):
    want, _ = ReconstructionEval(vae, mesh)(params, held[:10])
  for key in ("psnr", "ssim", "latent_scale_factor"):
    assert summary[key] == pytest.approx(want[key], rel=1e-4), key
