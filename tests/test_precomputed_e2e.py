"""docs/CONDITIONING.md's "Embeddings from any encoder" recipe end to end, as a user runs it, on the
seed's audio -> text -> image use: tiny synthetic audio clips (two tones each), a stand-in speech
recognizer (tone frequencies -> words), a random-weight CLIP text encoder of ours giving [L, D] per
transcript, stored as KEY.npy beside KEY.jpg in WebDataset shards; then the encode CLI, train.py
for 2 steps on the latent shards, and sample.py --embeddings from the checkpoint."""

import io
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from latent_diffusion_jax.data import shapes
from latent_diffusion_jax.data.tokenizers import build_word_tokenizer, load_tokenizer, tokenize
from latent_diffusion_jax.models.text_encoders import CLIPTextModel
from test_encode_conditions import npy
from test_shapes_conditional_e2e import _run
from test_webdataset import write_shard
from tiny_bundles import _init

pytestmark = pytest.mark.slow

CONFIG = "configs/shapes_ldm.py:tiny"
WIDTH = 64  # D: the tiny config's model.unet.cross_attention_dim
LENGTH = 6  # L: "a red circle" with start and end tokens, padded
RATE = 8000  # audio samples per second
# The stand-in recognizer's two tone bands: one tone names the color, the other the shape.
COLOR_TONES = {"red": 300.0, "green": 500.0, "blue": 700.0}
SHAPE_TONES = {"circle": 1500.0, "square": 2000.0, "triangle": 2500.0}
NUM_CLIPS = 8


def audio_clip(color: str, shape: str, seed: int) -> np.ndarray:
  """0.25 s of the two tones, slightly detuned and noisy, so the recognizer has work to do."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(0.25 * RATE)) / RATE
  tones = [COLOR_TONES[color], SHAPE_TONES[shape]]
  wave = sum(np.sin(2 * np.pi * f * (1 + rng.uniform(-0.02, 0.02)) * t + rng.uniform(0, 6))
             for f in tones)
  return (wave + 0.3 * rng.standard_normal(t.shape)).astype(np.float32)


def recognize(clip: np.ndarray) -> str:
  """The stand-in for a speech model: the loudest tone in each band, read as a word."""
  spectrum = np.abs(np.fft.rfft(clip))
  freqs = np.fft.rfftfreq(len(clip), 1 / RATE)

  def word(tones):
    band = (freqs > 200) & (freqs < 1000) if tones is COLOR_TONES else freqs >= 1000
    peak = freqs[band][np.argmax(spectrum[band])]
    return min(tones, key=lambda w: abs(tones[w] - peak))

  return f"a {word(COLOR_TONES)} {word(SHAPE_TONES)}"


class TextModel:
  """A text encoder the user picked, here with random weights: transcript -> [L, D]."""

  def __init__(self, tmp):
    self.tokenizer = load_tokenizer(build_word_tokenizer(shapes.vocabulary(), str(tmp / "tok"),
                                                         LENGTH))
    self.module = CLIPTextModel(vocab_size=len(self.tokenizer.get_vocab()), hidden_size=WIDTH,
                                intermediate_size=2 * WIDTH, num_hidden_layers=1,
                                num_attention_heads=4, max_position_embeddings=LENGTH,
                                eos_token_id=self.tokenizer.eos_token_id)
    self.params = _init(self.module, jnp.zeros((1, LENGTH), jnp.int32), seed=7)

  def __call__(self, texts) -> np.ndarray:
    ids = tokenize(self.tokenizer, texts, LENGTH)
    return np.asarray(self.module.apply({"params": self.params}, ids).context,
                      np.float32)


def jpeg(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, "JPEG", quality=95)
  return buf.getvalue()


def write_audio_shards(directory, text_model):
  """Recipe step 1: per sample, the transcript's embedding [L, D] as KEY.npy beside KEY.jpg.
  Returns {key: transcript}."""
  rng = np.random.default_rng(0)
  shards, transcripts = [{}, {}], {}
  for i in range(NUM_CLIPS):
    color, shape = rng.choice(list(COLOR_TONES)), rng.choice(list(SHAPE_TONES))
    transcript = recognize(audio_clip(color, shape, seed=i))
    assert transcript == f"a {color} {shape}"  # the recognizer hears what was played
    attributes = shapes.sample_attributes(shapes.example_rng(i), "train")
    attributes.update(color=color, shape=shape)
    key = f"{i:06d}"
    shards[i % 2][key] = {"jpg": jpeg(shapes.render(attributes, 32)),
                          "npy": npy(text_model([transcript])[0])}
    transcripts[key] = transcript
  for index, samples in enumerate(shards):
    write_shard(directory / f"{index:05d}.tar", samples)
  return transcripts


def read_images(directory):
  names = sorted(n for n in os.listdir(directory) if n.endswith(".png") and n != "grid.png")
  return [np.asarray(Image.open(os.path.join(directory, n))) for n in names]


def test_audio_to_text_to_image_recipe(tmp_path):
  text_model = TextModel(tmp_path)
  shards = tmp_path / "shards"
  shards.mkdir()
  transcripts = write_audio_shards(shards, text_model)
  assert len(set(transcripts.values())) > 1

  shape_flags = [f"--config.model.conditioner.precomputed.width={WIDTH}",
                 f"--config.model.conditioner.precomputed.length={LENGTH}"]
  latents = str(tmp_path / "latents")
  _run(["-m", "latent_diffusion_jax.cli.encode", "--config", CONFIG,
        "--config.encode.embedding_field=npy", "--config.model.conditioner.kind=precomputed",
        *shape_flags, "--config.encode.batch_size=8", "--input", str(shards / "*.tar"),
        "--output", latents])
  manifest = json.load(open(os.path.join(latents, "manifest.json")))
  assert manifest["embeddings_shape"] == [LENGTH, WIDTH]
  assert manifest["num_examples"] == NUM_CLIPS  # no caption needed, every embedding fits

  run = str(tmp_path / "run")
  # For time only (compiles dominate on 2 cores): a two-level UNet, the encoder's latent scale
  # estimate instead of a second pass over the data, and one checkpoint written synchronously
  # (an asynchronous save added about 15 s on a loaded machine with a cold compilation cache).
  speed = ["--config.model.unet.block_out_channels=(32,64)",
           "--config.model.unet.attention_levels=(False,True)",
           f"--config.model.latent_scale_factor={manifest['estimated_scale_factor']}",
           "--config.training.checkpoint_every=2", "--config.training.async_checkpointing=False"]
  _run(["train.py", "--config", CONFIG, "--workdir", run,
        "--config.model.conditioner.kind=precomputed", *shape_flags,
        "--config.data.kind=latent_shards", f"--config.data.latent_shards={latents}",
        "--config.data.shuffle_buffer=8", "--config.training.sample_every=0", *speed])
  assert "2" in os.listdir(os.path.join(run, "checkpoints"))

  # Two embeddings files whose first rows are the same transcript and second rows differ: image i
  # starts from the same noise in both runs, so only the embedding can change it.
  first, second, third = text_model(["a red circle", "a blue square", "a green triangle"])
  files = {}
  for name, rows in (("a", [first, second]), ("b", [first, third])):
    files[name] = str(tmp_path / f"{name}.npy")
    np.save(files[name], np.stack(rows))
  sample_flags = ["--checkpoint", run, "--steps=2", "--guidance_scale=3", "--seed=5"]
  for name, path in files.items():
    _run(["sample.py", *sample_flags, "--embeddings", path, "--out", str(tmp_path / name)])
  a, b = read_images(tmp_path / "a"), read_images(tmp_path / "b")
  assert len(a) == len(b) == 2 and a[0].shape == (32, 32, 3)
  np.testing.assert_array_equal(a[0], b[0])  # same embedding, same image
  # Another embedding, another image: more than rounding (about 6 levels of 255 on average here).
  assert np.abs(a[1].astype(int) - b[1].astype(int)).mean() > 1
  settings = json.load(open(tmp_path / "a" / "settings.json"))
  assert settings["embeddings_file"] == files["a"]
  assert settings["embeddings_shape"] == [2, LENGTH, WIDTH]

  wrong = str(tmp_path / "wrong.npy")
  np.save(wrong, np.zeros((LENGTH, WIDTH + 8), np.float32))
  proc = _run(["sample.py", *sample_flags, "--embeddings", wrong, "--out", str(tmp_path / "w")],
              returncode=1)
  assert f"[n, L, {WIDTH}]" in proc.stderr and "precomputed.width" in proc.stderr
  assert "Traceback" not in proc.stderr
