"""Control images for ControlNet training and the placement evaluator (fast, no networks)."""

import numpy as np
import pytest

from latent_diffusion_jax.core.config import base_config
from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.data import control, shapes
from latent_diffusion_jax.evaluation import placement


def _examples(count, split="train", size=32):
  images, captions, attrs = shapes.generate_batch(0, count, split=split, image_size=size)
  return images, captions, attrs


def test_mask_read_from_pixels_is_the_generators_geometry():
  images, _, attrs = _examples(48)
  mask = control.shape_mask(images)
  expected = np.stack([shapes.coverage(a, 32) >= 0.5 for a in attrs])
  # Pixels covered within a rounding step of one half may fall either way.
  near_half = np.stack([np.abs(shapes.coverage(a, 32) - 0.5) < 0.02 for a in attrs])
  assert np.array_equal(mask[~near_half], expected[~near_half])
  assert mask.sum() > 0.9 * expected.sum()


def test_hints_outline_and_segmentation():
  images, _, attrs = _examples(16)
  seg = control.control_hint(images, "segmentation")
  edge = control.control_hint(images, "outline")
  assert seg.shape == edge.shape == (16, 32, 32, 3)
  assert seg.dtype == np.float16 and set(np.unique(seg)) <= {0.0, 1.0}
  assert np.array_equal(seg[..., 0], seg[..., 2])
  # The outline lies on the filled shape, is thinner, and surrounds its interior.
  assert np.all(edge <= seg)
  assert 0 < edge.sum() < seg.sum()
  interior = seg[..., 0].astype(bool) & ~edge[..., 0].astype(bool)
  padded = np.pad(interior, ((0, 0), (1, 1), (1, 1)))
  outside = ~np.pad(seg[..., 0].astype(bool), ((0, 0), (1, 1), (1, 1)))
  # No interior pixel touches the outside: the outline separates them.
  for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
    assert not np.any(padded & np.roll(outside, (dy, dx), axis=(1, 2)))
  one = control.control_hint(images, "segmentation", channels=1)
  assert one.shape == (16, 32, 32, 1)
  # Each hint's centroid sits in the caption's grid cell.
  for hint, a in zip(seg, attrs):
    ys, xs = np.nonzero(hint[..., 0])
    cell = 2 * int(ys.mean() + 0.5 >= 16) + int(xs.mean() + 0.5 >= 16)
    assert shapes.POSITIONS[cell] == a["position"]
  with pytest.raises(UserInputError, match="data.control"):
    control.control_hint(images, "canny")


def test_geometry_hint_equals_the_pixel_hint():
  images, _, attrs = _examples(8)
  for kind in control.CONTROL_KINDS:
    from_pixels = control.control_hint(images, kind).astype(np.float32)
    from_geometry = np.stack([control.hint_from_coverage(shapes.coverage(a, 32), kind)
                              for a in attrs])
    assert np.mean(from_pixels == from_geometry) > 0.995


def test_drop_position_words():
  assert control.drop_position(["a red circle in the top left", "a blue square in the bottom right",
                                "a large cyan triangle in the top right"]) == [
      "a red circle", "a blue square", "a large cyan triangle"]


def test_shapes_split_with_control_and_without_positions(tmp_path):
  from latent_diffusion_jax.data.batches import load_shapes_split
  from latent_diffusion_jax.data.tokenizers import build_word_tokenizer, load_tokenizer, tokenize
  c = base_config()
  c.model.image_size = 32
  c.model.text_encoder.max_length = 12
  c.data.num_train, c.data.num_test = 32, 8
  c.data.control = "outline"
  c.data.drop_position_words = True
  tok = load_tokenizer(build_word_tokenizer(shapes.vocabulary(), str(tmp_path / "tok"), 12))
  out = load_shapes_split(c, str(tmp_path), tok, "train")
  assert out["control"].shape == (32, 32, 32, 3)
  assert np.array_equal(out["control"], control.control_hint(out["images"], "outline"))
  texts = tok.batch_decode(out["input_ids"], skip_special_tokens=True)
  assert all(t.split()[0] == "a" and len(t.split()) == 3 for t in texts), texts[:4]
  assert not any(w in t.split() for t in texts for w in ("top", "bottom", "left", "right", "in"))
  # The captions' other words survive: "a <color> <shape>".
  plain = tokenize(tok, ["a red circle"], 12)[0]
  assert np.count_nonzero(out["input_ids"][0] != tok.pad_token_id) == np.count_nonzero(
      plain != tok.pad_token_id)


def test_held_out_layouts_put_position_only_in_the_control_map():
  prompts, hints, attrs = placement.held_out_layouts(2, kind="segmentation")
  assert len(prompts) == len(attrs) == hints.shape[0] == 2 * len(shapes.HELD_OUT_COMBINATIONS)
  assert hints.shape[1:] == (32, 32, 3) and hints.dtype == np.float32
  assert all("top" not in p and "bottom" not in p for p in prompts)
  assert prompts[0] == "a red circle"
  for hint, a in zip(hints, attrs):
    assert (a["color"], a["shape"], a["position"]) in shapes.HELD_OUT_COMBINATIONS
    ys, xs = np.nonzero(hint[..., 0])
    cell = 2 * int(ys.mean() + 0.5 >= 16) + int(xs.mean() + 0.5 >= 16)
    assert shapes.POSITIONS[cell] == a["position"]
  # Two layouts of one combination differ in geometry.
  assert not np.array_equal(hints[0], hints[1])


def test_placement_scores_right_and_wrong_places():
  _, _, attrs = placement.held_out_layouts(1)
  right = np.stack([shapes.render(a) for a in attrs])
  moved = [dict(a, position=shapes.POSITIONS[(shapes.POSITIONS.index(a["position"]) + 1) % 4])
           for a in attrs]
  wrong = np.stack([shapes.render(a) for a in moved])
  good = placement.placement_scores(right, attrs)
  assert good["placement"] == 1.0 and good["color"] == 1.0 and good["num_examples"] == 12
  bad = placement.placement_scores(wrong, attrs)
  assert bad["placement"] == 0.0 and bad["color"] == 1.0
  blank = placement.placement_scores(np.zeros_like(right), attrs)
  assert blank["placement"] == 0.0
  with pytest.raises(UserInputError):
    placement.placement_scores(right[:3], attrs)


def _png(array):
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, "PNG")
  return buf.getvalue()


def test_webdataset_control_member_is_cropped_like_the_image(tmp_path):
  """A 24x40 image and its control image of the same size: one square crop for both, the
  control as float [0, 1]; a sample without the member is skipped."""
  from latent_diffusion_jax.data import webdataset as wds
  from latent_diffusion_jax.data.tokenizers import build_word_tokenizer, load_tokenizer
  rng = np.random.default_rng(0)
  samples = []
  for j in range(6):
    image = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    hint = (image > 127).astype(np.uint8) * 255  # a function of the pixels, so pairs stay aligned
    files = {"png": _png(image), "txt": b"a red circle"}
    if j != 5:
      files["control.png"] = _png(hint)
    samples.append((f"k{j}", files))
  wds.write_tar_shard(str(tmp_path / "00000.tar"), samples)
  tok = load_tokenizer(build_word_tokenizer(shapes.vocabulary(), str(tmp_path / "tok"), 12))
  c = base_config()
  c.model.image_size, c.data.webdataset = 16, str(tmp_path / "00000.tar")
  c.model.text_encoder.max_length, c.data.shuffle_buffer = 12, 4
  c.data.control_member = "control.png"
  prep = wds.Preprocessing.from_config(c)
  records = list(wds.read_samples([c.data.webdataset], prep).as_numpy_iterator())
  assert [r["status"] for r in records[:-1]] == [b""] * 5 + [b"missing_control"]
  it = wds.training_reader(c, 4, tokenizer=tok, process_index=0, process_count=1)
  batch = next(it)
  assert batch["control"].shape == (4, 16, 16, 3) and batch["control"].dtype == np.float32
  assert 0.0 <= batch["control"].min() and batch["control"].max() <= 1.0
  # Resizing blurs both alike, so the control still follows the image's bright pixels.
  bright = batch["images"].astype(np.float32) / 255
  assert np.corrcoef(bright.ravel(), batch["control"].ravel())[0, 1] > 0.6
  assert "control_member" not in wds.Preprocessing.from_config(base_config()).describe()
