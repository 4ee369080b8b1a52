"""The evaluate command and in-training evaluation, with the shapes feature network.

Fast tests: the shapes network (train briefly, save, load, missing weights), captions, the shard
store. Slow tests share one tiny run: 2 processes x 4 CPU devices (gloo on 127.0.0.1) train the
:tiny stage-2 config for 2 steps with the evaluation hook at step 2 (its TensorBoard scalars and
report are checked); the command then evaluates that workdir, interrupted after its first shard
and resumed to the metrics of an uninterrupted run, scores a folder of the same images to the same
numbers, and stops on bad input with a message.
"""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from latent_diffusion_jax.core.errors import (InputFileError, MissingInputError, UserError,
                                              UserInputError)
from latent_diffusion_jax.data import shapes
from latent_diffusion_jax.evaluation.captions import read_captions
from latent_diffusion_jax.evaluation.feature_nets import shapes as shapes_net
from latent_diffusion_jax.evaluation.generated_shards import ShardStore
from test_multihost import TINY_LDM  # the same tiny networks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import chaos  # noqa: E402  (bench/chaos.py: train.py runners)


@pytest.fixture(scope="module")
def shapes_weights(tmp_path_factory):
  """A briefly trained shapes network (enough to name colors; the real one trains 500 steps)."""
  result = shapes_net.train(num_train=1024, num_eval=256, steps=60, batch_size=64,
                            learning_rate=3e-3, log_fn=lambda _: None)
  path = str(tmp_path_factory.mktemp("shapes_net") / "shapes_features.msgpack")
  shapes_net.save(path, result.params, result.accuracy)
  return path, result


def test_shapes_network_learns_and_round_trips(shapes_weights):
  path, result = shapes_weights
  # 60 steps already name the color far above chance (1/6).
  assert result.accuracy["color"] > 0.5, result.accuracy
  net = shapes_net.load(path)
  assert (net.name, net.dim) == ("shapes", shapes_net.FEATURE_DIM)
  images, _, _ = shapes.generate_batch(0, 12, seed=3)
  out = net.extract(images, batch_size=8)
  assert out["features"].shape == (12, shapes_net.FEATURE_DIM)
  assert out["logits"].shape == (12, sum(len(v) for v in shapes_net.HEADS.values()))
  want = shapes_net._apply(result.params, images.astype(np.float32) / 255.0)
  np.testing.assert_allclose(out["features"], np.asarray(want["features"]), rtol=1e-5, atol=1e-5)
  # 64 px images are resized to the network's 32 px first.
  big, _, _ = shapes.generate_batch(0, 4, seed=3, image_size=64)
  assert net.extract(big)["features"].shape == (4, shapes_net.FEATURE_DIM)


def test_missing_or_foreign_shapes_weights_name_the_train_command(tmp_path):
  with pytest.raises(MissingInputError, match="cli.train_shapes_features --out"):
    shapes_net.load(str(tmp_path / "none.msgpack"))
  bad = tmp_path / "bad.msgpack"
  bad.write_bytes(b"not msgpack at all")
  with pytest.raises(InputFileError, match="not a shapes feature network file"):
    shapes_net.load(str(bad))


def test_captions_from_text_and_coco_json(tmp_path):
  text = tmp_path / "c.txt"
  text.write_text("a red circle\n\n# comment\na blue square\n")
  assert read_captions(str(text), 5) == ["a red circle", "a blue square"] * 2 + ["a red circle"]
  coco = tmp_path / "captions_val2014.json"
  annotations = [{"id": i, "image_id": i // 5, "caption": f" caption  {i} "} for i in range(50)]
  coco.write_text(json.dumps({"annotations": annotations[::-1]}))
  subset = read_captions(str(coco), 10)
  assert len(set(subset)) == 10 and subset == read_captions(str(coco), 10)
  assert subset != [f"caption {i}" for i in range(10)]  # a seeded subset, not the first ten
  assert read_captions(str(coco)) == [f"caption {i}" for i in range(50)]
  with pytest.raises(MissingInputError, match="captions file"):
    read_captions(str(tmp_path / "missing.txt"), 3)
  (tmp_path / "bad.json").write_text('{"images": []}')
  with pytest.raises(InputFileError, match=r"annotations\[\].caption"):
    read_captions(str(tmp_path / "bad.json"))


def test_shard_store_refuses_other_settings_and_finds_missing_shards(tmp_path):
  store = ShardStore(str(tmp_path), {"seed": 0, "steps": 2}, shard_size=4)
  assert store.missing(10) == [0, 1, 2]
  images = np.zeros((4, 8, 8, 3), np.uint8)
  store.write(1, images, ["x"] * 4)
  assert store.missing(10) == [0, 2]
  with pytest.raises(UserInputError, match="steps: 2 there, 3 now"):
    ShardStore(str(tmp_path), {"seed": 0, "steps": 3}, shard_size=4)
  with pytest.raises(InputFileError, match="other captions"):
    store.read(1, 10, ["y"] * 10)


def test_mlperf_config_pins_the_protocol():
  from latent_diffusion_jax.core.config import base_config, load_config_file
  assert base_config().evaluation.every == 0  # off unless a config asks for it
  c = load_config_file(os.path.join(ROOT, "configs/mlperf_sd.py"))
  e = c.evaluation
  assert (c.model.image_size, e.sampler, e.num_steps, e.guidance_scale) == (512, "ddim", 50, 8.0)
  assert e.num_images == 30_000 and tuple(e.metrics) == ("fid", "clip")
  assert e.features == "inception" and e.captions_file.endswith("captions_val2014.json")
  # SD 2 base: head dim 64, linear projections, OpenCLIP ViT-H text read at its penultimate layer.
  assert c.model.unet.head_dim == 64 and c.model.unet.use_linear_projection
  assert c.model.text_encoder.clip.hidden_size == 1024
  # Training as the reference yaml: v-parameterization, LR 1.25e-7 per image, constant after warmup.
  assert c.diffusion.prediction_type == "v_prediction"
  assert c.optimizer.learning_rate == pytest.approx(1.25e-7 * c.training.batch_size)
  assert (c.optimizer.warmup_steps, c.optimizer.schedule, c.optimizer.ema_decay) == (1000, "constant", 0.0)
  assert (c.diffusion.beta_start, c.diffusion.beta_end, c.diffusion.schedule) == (
      0.00085, 0.012, "scaled_linear")


# ---------------------------------------------------------------- one tiny run, 2 processes

EVAL_IMAGES = 12


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory, shapes_weights):
  """2 processes x 4 devices, data split over both, 2 steps, evaluation at step 2."""
  base = tmp_path_factory.mktemp("evaluate")
  data_dir = chaos.prepare_data(str(base / "tfds"))
  workdir = str(base / "ldm")
  args = ["--config", "configs/shapes_ldm.py:tiny", "--config.frozen.vae=",
          f"--config.data.data_dir={data_dir}", "--config.training.num_steps=2",
          "--config.training.sample_every=0", "--config.training.checkpoint_every=2",
          "--config.model.latent_scale_factor=0.5", "--config.evaluation.every=2",
          f"--config.evaluation.num_images={EVAL_IMAGES}", "--config.evaluation.features=shapes",
          f"--config.evaluation.shapes_weights={shapes_weights[0]}",
          "--config.evaluation.metrics=('fid','is','precision_recall')",
          "--config.evaluation.num_steps=2", "--config.evaluation.guidance_scale=3.0", *TINY_LDM]
  port = _free_port()
  procs, logs = [], []
  for i in range(2):
    extra = [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
             "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"]
    logs.append(str(base / f"train.process{i}.log"))
    procs.append(chaos.start(workdir, [*args, *extra], chaos.subprocess_env(4), logs[-1]))
  try:
    codes = [p.wait(timeout=900) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  texts = [chaos.read_log(path) for path in logs]
  if codes != [0, 0]:
    raise AssertionError(f"2-process run exited {codes}:\n" +
                         "\n".join(f"--- {p}\n{t[-4000:]}" for p, t in zip(logs, texts)))
  return base, workdir, texts, shapes_weights[0]


def _event_scalars(workdir):
  import tensorflow as tf
  out = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    for record in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for value in event.summary.value:
        if value.tag.startswith("eval/"):
          out[(value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
  return out


@pytest.mark.slow
def test_two_process_training_writes_eval_scalars(run):
  base, workdir, texts, _ = run
  for text in texts:  # both processes evaluated (each its part of the sharded work)
    assert "Step 2: evaluation eval/fid=" in text, text[-3000:]
  report = os.path.join(workdir, "eval", "step_0000002", "metrics.json")
  with open(report) as f:
    metrics = json.load(f)["metrics"]
  assert np.isfinite(metrics["fid"]) and metrics["fid"] > 0
  assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
  assert metrics["is"]["mean"] >= 1.0
  scalars = _event_scalars(workdir)
  assert scalars[("eval/fid", 2)] == pytest.approx(metrics["fid"], rel=1e-5)
  assert scalars[("eval/precision", 2)] == pytest.approx(metrics["precision"])
  assert ("eval/is/mean", 2) in scalars
  assert os.path.isfile(os.path.join(workdir, "eval", "reference_shapes.npz"))


def _evaluate(args, expect_ok=True):
  env = chaos.subprocess_env(2)
  proc = subprocess.run([sys.executable, "-m", "latent_diffusion_jax.evaluate", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)
  if expect_ok and proc.returncode != 0:
    raise AssertionError(f"evaluate {args} failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
  return proc


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory):
  """16 held-out shapes images as PNGs."""
  reference = tmp_path_factory.mktemp("reference")
  images, _, _ = shapes.generate_batch(0, 16, split="test", seed=9)
  for i, image in enumerate(images):
    Image.fromarray(image).save(reference / f"{i:03d}.png")
  return str(reference)


@pytest.fixture(scope="module")
def evaluated(run, reference_folder):
  """The command interrupted after one shard and resumed; and the same run uninterrupted."""
  base, workdir, _, weights = run
  captions = base / "captions.txt"
  captions.write_text("\n".join(shapes.caption(dict(color=c, shape=s, position=p))
                                for c, s, p in shapes.combinations("test")))
  reference = reference_folder
  common = ["--checkpoint", workdir, "--captions", str(captions), "--num_images", "10",
            "--reference_images", str(reference), "--features", "shapes",
            "--shapes_weights", weights, "--metrics", "fid,is,precision_recall", "--steps", "2",
            "--guidance_scale", "3", "--seed", "5", "--shard_size", "4"]
  out = str(base / "eval_resumed")
  first = _evaluate([*common, "--out", out, "--max_new_shards", "1"])
  shards = sorted(os.listdir(os.path.join(out, "generated")))
  reported_early = os.path.exists(os.path.join(out, "metrics.json"))
  first_mtime = os.path.getmtime(os.path.join(out, "generated", "shard_00000.npz"))
  second = _evaluate([*common, "--out", out])
  # Uninterrupted, in a process like the others (the same devices, so the same arithmetic).
  _evaluate([*common, "--out", str(base / "eval_whole")])
  with open(base / "eval_whole" / "metrics.json") as f:
    whole = json.load(f)
  return dict(base=base, workdir=workdir, out=out, first=first, second=second, shards=shards,
              first_mtime=first_mtime, reported_early=reported_early, whole=whole, captions=str(captions),
              reference=str(reference), weights=weights)


@pytest.mark.slow
def test_command_resumes_to_the_metrics_of_an_uninterrupted_run(evaluated):
  e = evaluated
  assert "Stopped after 1 new shards" in e["first"].stdout
  assert e["shards"] == ["manifest.json", "shard_00000.npz"]
  assert not e["reported_early"]  # no metrics from a partial set of images
  # The resumed run made only shards 1 and 2.
  assert os.path.getmtime(os.path.join(e["out"], "generated", "shard_00000.npz")) == e["first_mtime"]
  assert "4 images already there" in e["second"].stderr
  assert "ETA" in e["second"].stderr
  with open(os.path.join(e["out"], "metrics.json")) as f:
    resumed = json.load(f)["metrics"]
  whole = e["whole"]["metrics"]
  assert resumed.keys() == whole.keys() == {"fid", "is", "precision", "recall"}
  assert resumed == whole
  for k in range(3):  # the same images, bit for bit
    name = f"shard_{k:05d}.npz"
    with np.load(os.path.join(e["out"], "generated", name)) as a, \
        np.load(os.path.join(e["base"], "eval_whole", "generated", name)) as b:
      np.testing.assert_array_equal(a["images"], b["images"])
  assert "| fid |" in e["second"].stdout  # the Markdown table is printed
  assert glob.glob(os.path.join(e["out"], "reference_shapes_*.npz"))


@pytest.mark.slow
def test_shards_hold_the_images_of_one_call(evaluated):
  from latent_diffusion_jax.artifacts.loader import Source, load_bundle
  from latent_diffusion_jax.sampling.generation import generate
  e = evaluated
  bundle = load_bundle(Source(e["workdir"], kind="workdir"))
  captions = read_captions(e["captions"], 10)
  settings = dict(seed=5, num_steps=2, guidance_scale=3.0)
  want = generate(bundle, captions[:8], **settings).astype(np.int32)
  with np.load(os.path.join(e["out"], "generated", "shard_00001.npz")) as f:
    shard = f["images"].astype(np.int32)
  # Shard 1 (images 4..7) is what one call makes for them; this process has 8 devices, the
  # command had 2, so a pixel may round the other way.
  assert np.abs(shard - want[4:8]).max() <= 1
  alone = generate(bundle, captions[4:8], **settings).astype(np.int32)  # images 0..3's noise
  assert np.abs(alone - want[4:8]).mean() > 5


@pytest.mark.slow
def test_scoring_an_image_folder_gives_the_same_numbers(evaluated, tmp_path):
  from latent_diffusion_jax.evaluation.run import run_evaluation
  e = evaluated
  folder = tmp_path / "images"
  folder.mkdir()
  for shard in sorted(glob.glob(os.path.join(e["base"], "eval_whole", "generated", "shard_*.npz"))):
    with np.load(shard) as f:
      for index, image in zip(f["indices"], f["images"]):
        Image.fromarray(image).save(folder / f"{index:05d}.png")
  got = run_evaluation(out_dir=str(tmp_path / "out"), images=str(folder), captions=e["captions"],
                       reference_images=e["reference"], features="shapes",
                       shapes_weights=e["weights"], metrics=("fid", "is", "precision_recall"))
  want = e["whole"]["metrics"]
  assert got["settings"]["num_images"] == 10
  # The same pixels; features here come from this process's 8 devices, there from 2, and FID of
  # 10 images in 128 dimensions (a singular covariance) magnifies their rounding differences.
  assert got["metrics"]["precision"] == want["precision"]
  assert got["metrics"]["recall"] == want["recall"]
  assert got["metrics"]["fid"] == pytest.approx(want["fid"], rel=1e-4)


def test_bad_input_stops_with_a_message(shapes_weights, reference_folder, tmp_path):
  from latent_diffusion_jax.evaluation.metrics.fid import FeatureStats, save_stats
  from latent_diffusion_jax.evaluation.run import run_evaluation
  weights = shapes_weights[0]
  common = dict(features="shapes", shapes_weights=weights, metrics=("fid",))
  with pytest.raises(UserError, match="holds no image file"):
    run_evaluation(out_dir=str(tmp_path / "a"), images=str(tmp_path), reference_images=reference_folder,
                   **common)
  mixed = tmp_path / "mixed"
  mixed.mkdir()
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(mixed / "0.png")
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(mixed / "1.png")
  with pytest.raises(InputFileError, match="1.png is 16x16 but the images before it are 32x32"):
    run_evaluation(out_dir=str(tmp_path / "b"), images=str(mixed),
                   reference_images=reference_folder, **common)
  wide = tmp_path / "wide.npz"
  save_stats(str(wide), FeatureStats(np.zeros(2048), np.eye(2048)))
  with pytest.raises(UserInputError, match="2048-d statistics but the shapes network gives 128-d"):
    run_evaluation(out_dir=str(tmp_path / "c"), images=reference_folder,
                   reference_stats=str(wide), **common)
  with pytest.raises(UserInputError, match="FID needs at least 2 images"):
    run_evaluation(out_dir=str(tmp_path / "d"), images=reference_folder, num_images=1,
                   reference_images=reference_folder, **common)
  # The command line: the message and exit status 1, no traceback.
  proc = _evaluate(["--images", reference_folder, "--captions", str(tmp_path / "nope.txt"),
                    "--reference_images", reference_folder, "--features", "shapes",
                    "--shapes_weights", weights, "--out", str(tmp_path / "e")],
                   expect_ok=False)
  assert proc.returncode == 1
  assert "evaluate: MissingInputError: captions file" in proc.stderr and "Traceback" not in proc.stderr
