"""Training image-conditioned models (issue 14): the mask generator, the low-res degradation, the
shapes segmentation maps, the config -> UNet width and the errors before training (fast); the
three shapes configs trained two steps by train.py and sampled with sampling.image_conditioned
(slow)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion_jax.core.config import load_config_file
from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.data import degradation, image_conditioning_data, segmentation, shapes
from latent_diffusion_jax.data.inpaint_masks import MaskSettings, random_masks
from latent_diffusion_jax.models import build
from latent_diffusion_jax.models.autoencoder import AutoencoderKL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"inpainting": "shapes_inpaint_ldm.py", "upscaling": "shapes_sr_ldm.py",
           "semantic": "shapes_semantic_ldm.py"}


def _config(kind):
  return load_config_file(os.path.join(ROOT, "configs", CONFIGS[kind]) + ":tiny")


# Mask generator.

def test_masks_are_binary_seeded_and_independent_of_the_batch_size():
  s = MaskSettings(full_mask_prob=0.0)
  fn = jax.jit(random_masks, static_argnums=(1, 2, 3))
  key = jax.random.key(3)
  masks = np.asarray(fn(key, 16, (32, 32), s))
  assert masks.shape == (16, 32, 32, 1) and masks.dtype == np.float32
  assert set(np.unique(masks)) <= {0.0, 1.0}
  covered = masks.mean(axis=(1, 2, 3))
  assert (covered > 0).all() and (covered < 1).all()  # never empty, never full at p = 0
  assert len(set(np.round(covered, 4))) > 8  # examples differ
  np.testing.assert_array_equal(np.asarray(fn(key, 4, (32, 32), s)), masks[:4])
  assert not np.array_equal(np.asarray(fn(jax.random.key(4), 16, (32, 32), s)), masks)


def test_full_masks_follow_their_probability_and_strokes_alone_work():
  key = jax.random.key(0)
  fn = jax.jit(random_masks, static_argnums=(1, 2, 3))
  full = np.asarray(fn(key, 8, (16, 16), MaskSettings(full_mask_prob=1.0)))
  assert (full == 1).all()
  some = np.asarray(fn(key, 256, (16, 16), MaskSettings(full_mask_prob=0.25)))
  share = (some.mean(axis=(1, 2, 3)) == 1).mean()
  assert 0.15 < share < 0.37  # 64 expected of 256, sd ~7
  strokes = np.asarray(fn(key, 8, (32, 32), MaskSettings(
      full_mask_prob=0.0, max_boxes=0, max_strokes=1, stroke_width=(0.1, 0.1))))
  covered = strokes.mean(axis=(1, 2, 3))
  # One stroke of 3 segments, 0.1-0.4 long and 0.1 wide: between a dot and ~12% of the image.
  assert (covered > 0).all() and (covered < 0.2).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(full_mask_prob=1.5), "full_mask_prob"),
    (dict(max_boxes=0, max_strokes=0), "not both 0"),
    (dict(stroke_vertices=1), "stroke_vertices"),
    (dict(box_size=(0.5, 0.2)), "box_size"),
])
def test_bad_mask_settings_are_named(kwargs, match):
  with pytest.raises(UserInputError, match=match):
    MaskSettings(**kwargs)


# Degradation and segmentation maps.

def test_area_degradation_averages_cells_and_resampling_keeps_flat_images():
  images = np.zeros((2, 8, 8, 3), np.uint8)
  images[0, :4, :4] = 200  # one whole 4x4 cell, and half of another's rows in image 1
  images[1, :2, :4] = 100
  low = degradation.degrade(images, 4, "area")
  assert low.shape == (2, 2, 2, 3) and low.dtype == np.uint8
  np.testing.assert_array_equal(low[0, :, :, 0], [[200, 0], [0, 0]])
  np.testing.assert_array_equal(low[1, :, :, 0], [[50, 0], [0, 0]])
  flat = np.full((1, 16, 16, 3), 77, np.uint8)
  for method in ("bilinear", "bicubic"):
    np.testing.assert_array_equal(degradation.degrade(flat, 4, method), 77)
  real, _, _ = shapes.generate_batch(0, 2, image_size=32)
  bicubic = degradation.degrade(real, 4, "bicubic").astype(np.float32)
  # A smooth resampling stays close to the box average of the same image.
  assert np.abs(bicubic - degradation.degrade(real, 4, "area")).mean() < 12


def test_degradation_errors_are_named():
  with pytest.raises(UserInputError, match="does not divide"):
    degradation.degrade(np.zeros((1, 30, 30, 3), np.uint8), 4)
  with pytest.raises(UserInputError, match="Unknown degradation"):
    degradation.degrade(np.zeros((1, 8, 8, 3), np.uint8), 2, "lanczos")


def _maps(images, attrs, scheme="shape"):
  return segmentation.shapes_segmentation(images, [a["color"] for a in attrs],
                                          [a["shape"] for a in attrs], scheme)


def test_segmentation_maps_follow_the_generator_geometry():
  images, _, attrs = shapes.generate_batch(0, 6, image_size=32)
  labels = _maps(images, attrs)
  assert labels.shape == (6, 32, 32) and labels.dtype == np.uint8
  for label, a in zip(labels, attrs):
    inside = shapes.coverage(a, 32) >= 0.5
    assert set(np.unique(label)) == {0, 1 + shapes.SHAPES.index(a["shape"])}
    # The pixels' mask is the coverage thresholded at half, up to rounding at the edges.
    assert np.mean((label > 0) != inside) < 0.01
  segmentation.check_classes(labels, segmentation.num_classes("shape"))
  with pytest.raises(UserInputError, match=r"num_classes=2"):
    segmentation.check_classes(np.full((1, 4, 4), 3), 2)


def test_segmentation_schemes_name_distinct_classes():
  ids = {scheme: {segmentation.class_id(c, s, scheme) for c in shapes.COLORS
                  for s in shapes.SHAPES} for scheme in segmentation.SCHEMES}
  for scheme, found in ids.items():
    assert found == set(range(1, segmentation.num_classes(scheme)))
  assert segmentation.class_id("green", "square", "color_shape") == 1 + 1 * 3 + 1
  images, _, attrs = shapes.generate_batch(0, 3, image_size=32)
  by_shape, by_both = _maps(images, attrs, "shape"), _maps(images, attrs, "color_shape")
  np.testing.assert_array_equal(by_shape > 0, by_both > 0)
  with pytest.raises(UserInputError, match="Unknown segmentation scheme 'texture'"):
    segmentation.num_classes("texture")


def test_shapes_fields_by_kind():
  images, _, attrs = shapes.generate_batch(0, 4, image_size=32)
  arrays = {"images": images, "shape": np.array([a["shape"] for a in attrs]),
            "color": np.array([a["color"] for a in attrs])}
  c = _config("upscaling")
  low = image_conditioning_data.shapes_fields(c, arrays)["low_res"]
  assert low.shape == (4, 8, 8, 3)
  np.testing.assert_array_equal(low, degradation.degrade(images, 4, "bicubic"))
  c = _config("semantic")
  seg = image_conditioning_data.shapes_fields(c, arrays)["segmentation"]
  assert seg.shape == (4, 32, 32)
  np.testing.assert_array_equal(seg, _maps(images, attrs, "color_shape"))
  c.model.image_conditioning.num_classes = 2
  with pytest.raises(UserInputError, match="class ids"):
    image_conditioning_data.shapes_fields(c, arrays)
  c = _config("inpainting")
  assert image_conditioning_data.shapes_fields(c, arrays) == {}
  assert image_conditioning_data.keeps_images(c)


# Config -> UNet, and errors before any data.

@pytest.mark.parametrize("kind,width", [("inpainting", 9), ("upscaling", 7), ("semantic", 23)])
def test_unet_width_follows_the_kind(kind, width):
  c = _config(kind)
  assert build.build_unet(c.model).in_channels == width
  c.model.unet.in_channels = width  # the full width is accepted as well
  unet = build.build_unet(c.model)
  assert unet.in_channels == width
  assert unet.num_class_embeds == (351 if kind == "upscaling" else None)
  assert build.image_conditioning(c.model).kind == kind
  c.model.unet.in_channels = width + 1
  with pytest.raises(UserInputError, match=rf"in_channels={width + 1}.*{kind}.*in_channels={width}"):
    build.build_unet(c.model)


def test_unconditioned_and_stored_configs_keep_their_unet():
  c = load_config_file(os.path.join(ROOT, "configs", "shapes_ldm.py:tiny"))
  assert build.image_conditioning(c.model) is None
  assert build.build_unet(c.model).in_channels == 4
  del c.model["image_conditioning"]  # a config stored before the key existed
  assert build.image_conditioning(c.model) is None and build.build_unet(c.model).in_channels == 4


def _vae():
  return AutoencoderKL(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8)


def test_config_errors_before_training():
  from latent_diffusion_jax.training import image_conditions
  c = _config("upscaling")
  c.model.image_conditioning.low_res_factor = 3
  with pytest.raises(UserInputError, match="factor 3 does not divide model.image_size=32"):
    image_conditions.from_config(c, _vae())
  c.model.image_conditioning.low_res_factor = 2
  with pytest.raises(UserInputError, match="first stage's factor 4"):
    image_conditions.from_config(c, _vae())
  c = _config("upscaling")
  c.model.image_conditioning.noise_level_range = (0, 1200)
  with pytest.raises(UserInputError, match="noise_level_range"):
    image_conditions.from_config(c, _vae())
  c = _config("semantic")
  c.model.image_conditioning.num_classes = 3
  with pytest.raises(UserInputError, match="'color_shape'.*at least 19"):
    image_conditions.from_config(c, _vae())
  c.model.image_conditioning.num_classes = 0
  with pytest.raises(UserInputError, match="num_classes >= 1"):
    image_conditions.from_config(c, _vae())
  c = _config("inpainting")
  c.data.kind = "webdataset"
  with pytest.raises(UserInputError, match="data.kind='shapes'"):
    image_conditions.from_config(c, _vae())
  c = _config("inpainting")
  c.model.image_conditioning.kind = "depth"
  with pytest.raises(UserInputError, match="Unknown model.image_conditioning.kind 'depth'"):
    image_conditions.from_config(c, _vae())


def test_condition_channels_by_kind():
  """The channels the step concatenates: shapes, the mask channel, noise levels as labels."""
  from latent_diffusion_jax.training import image_conditions
  vae = _vae()
  params = jax.jit(vae.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  images, _, attrs = shapes.generate_batch(0, 4, image_size=16)
  batch = {"images": jnp.asarray(images), "low_res": jnp.asarray(degradation.degrade(images, 4)),
           "segmentation": jnp.asarray(_maps(images, attrs, "color_shape"))}
  out = {}
  for kind in CONFIGS:
    c = _config(kind)
    c.model.image_size = 16
    task = image_conditions.from_config(c, vae)
    fn = jax.jit(lambda p, b, k: image_conditions.condition_channels(  # noqa: B023
        task, vae, p, b, jnp.float32(0.5), k))
    out[kind] = fn(params, batch, jax.random.key(1))
  extra, labels = out["inpainting"]
  assert extra.shape == (4, 4, 4, 5) and labels is None
  assert set(np.unique(np.asarray(extra[..., 0]))) <= {0.0, 1.0}
  extra, labels = out["upscaling"]
  assert extra.shape == (4, 4, 4, 3) and labels.shape == (4,)
  assert (np.asarray(labels) >= 0).all() and (np.asarray(labels) <= 350).all()
  extra, labels = out["semantic"]
  assert extra.shape == (4, 4, 4, 19) and labels is None
  np.testing.assert_allclose(np.asarray(extra).sum(-1), 1.0, rtol=1e-6)


# End to end: train.py on each tiny config, then sampling.image_conditioned on the workdir.

def _train(args):
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"].replace(
      "--xla_force_host_platform_device_count=8", "--xla_force_host_platform_device_count=2"))
  return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  base = tmp_path_factory.mktemp("img_cond")
  out = {}
  for kind, name in CONFIGS.items():
    workdir = str(base / kind)
    proc = _train(["--config", f"configs/{name}:tiny", "--workdir", workdir,
                   f"--config.data.data_dir={base / 'tfds'}"])
    assert proc.returncode == 0, proc.stderr[-6000:]
    out[kind] = workdir
  return out


@pytest.mark.slow
def test_trained_workdirs_sample_with_their_conditioning(trained):
  from latent_diffusion_jax.artifacts.workdir import load_bundle
  from latent_diffusion_jax.sampling import image_conditioned as sampling
  images, _, attrs = shapes.generate_batch(0, 2, split="test", image_size=32)
  prompts = ["a red circle in the top left", "a blue square in the bottom right"]
  common = dict(num_steps=2, seed=0, guidance_scale=2.0)
  results = {}
  for kind, workdir in trained.items():
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
    bundle = load_bundle(workdir)
    assert bundle.image_conditioning.kind == kind
    if kind == "inpainting":
      mask = np.zeros((2, 32, 32), np.uint8)
      mask[:, 8:24, 8:24] = 255
      out = sampling.inpaint(bundle, prompts, images, mask, **common)
    elif kind == "upscaling":
      assert bundle.image_conditioning.max_noise_level == 350
      assert bundle.unet.in_channels == 7 and bundle.unet.num_class_embeds == 351
      out = sampling.upscale(bundle, prompts, degradation.degrade(images, 4), noise_level=20,
                             **common)
    else:
      labels = _maps(images, attrs, "color_shape")
      out = sampling.semantic_to_image(bundle, prompts, labels, **common)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    results[kind] = out
  assert not np.array_equal(results["inpainting"], results["semantic"])


@pytest.mark.slow
def test_train_py_names_a_unet_width_that_does_not_fit(tmp_path):
  proc = _train(["--config", "configs/shapes_inpaint_ldm.py:tiny", "--workdir", str(tmp_path / "w"),
                 "--config.model.unet.in_channels=5"])
  assert proc.returncode != 0
  assert "model.unet.in_channels=5 does not fit" in proc.stderr
  assert "Traceback" not in proc.stderr
