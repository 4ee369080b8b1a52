r"""Latent-shard reader throughput: batches/s delivered to the host, and the cost of a resume.

  .venv/bin/python bench/reader_throughput.py --config configs/sd15.py:tiny --resolution 32
  python bench/reader_throughput.py --config configs/sd15.py --resolution 512 --batch_size 256

Writes synthetic latent shards shaped like the config's (moments [S/f, S/f, 2C] float16 + token ids;
--num_files x --per_file examples) outside the clock, then reads them with the training reader
(`latent_shards.training_reader`: window interleave, shuffle, batch, parse, prefetch) and reports:
  first batch      seconds from building the pipeline to the first batch (shuffle buffer fill),
  host throughput  batches/s and examples/s of numpy batches handed to the trainer,
  global arrays    the same through `parallel.global_batch` onto this host's devices,
  resume           seconds to the first batch after `set_state` in the middle of a window.
Extra `--config.<key>=<value>` flags override the config (e.g. --config.data.shuffle_buffer=2000).
"""

import os
import sys
import tempfile
import time

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_RESOLUTION = flags.DEFINE_integer("resolution", None, "Image side the latents stand for.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch; 0: training.batch_size.")
_NUM_FILES = flags.DEFINE_integer("num_files", 8, "Synthetic latent shards.")
_PER_FILE = flags.DEFINE_integer("per_file", 512, "Examples per shard.")
_BATCHES = flags.DEFINE_integer("batches", 50, "Batches timed.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where the shards go; default a temp dir.")
flags.mark_flags_as_required(["config"])


def write_shards(directory, config, num_files, per_file):
  import numpy as np
  from latent_diffusion_jax.data import latent_shards as ls
  from latent_diffusion_jax.models import build
  size, channels = build.latent_size(config.model), 2 * config.model.vae.latent_channels
  length = config.model.text_encoder.max_length
  rng = np.random.default_rng(0)
  os.makedirs(directory, exist_ok=True)
  shards = {}
  for f in range(num_files):
    name = f"{f:05d}{ls.SHARD_SUFFIX}"
    writer = ls.ShardWriter(os.path.join(directory, name))
    for i in range(per_file):
      writer.write(ls.serialize_example(
          key=f"{f}/{i}", caption="a red circle in the top left",
          moments=rng.standard_normal((size, size, channels)).astype(np.float16),
          input_ids=rng.integers(0, 1000, length), original_size=(512, 512), crop_offset=(0, 0)))
    writer.commit()
    shards[name] = {"kept": per_file}
  ls.write_json(os.path.join(directory, ls.MANIFEST), {
      "shards": shards, "storage_dtype": "float16", "moments_shape": [size, size, channels],
      "max_length": length, "context_shape": None, "vae_fingerprint": "synthetic",
      "tokenizer_fingerprint": "synthetic"})
  return size, channels


def main(argv):
  del argv
  import jax
  import tensorflow as tf
  from latent_diffusion_jax.core import parallel
  from latent_diffusion_jax.data import latent_shards as ls
  config = _CONFIG.value
  if _RESOLUTION.value:
    config.model.image_size = _RESOLUTION.value
  batch = _BATCH.value or config.training.batch_size
  directory = os.path.join(_WORKDIR.value or tempfile.mkdtemp(prefix="reader_bench_"), "latents")
  size, channels = write_shards(directory, config, _NUM_FILES.value, _PER_FILE.value)
  config.data.kind, config.data.latent_shards = "latent_shards", directory

  start = time.perf_counter()
  reader = ls.training_reader(config, batch)
  next(reader)
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(reader)
  host = _BATCHES.value / (time.perf_counter() - start)

  mesh = parallel.create_mesh((-1, 1, 1), devices=jax.local_devices())
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    jax.block_until_ready(parallel.global_batch(next(reader), mesh))
  device = _BATCHES.value / (time.perf_counter() - start)

  # Halfway into the second window read: a resume re-reads the window up to there.
  window = min(config.data.files_per_window, _NUM_FILES.value) * _PER_FILE.value
  resume_at = (window * 3 // 2) // batch
  resumed = ls.training_reader(config, batch)
  resumed.set_state(dict(reader.get_state(), batches=resume_at))
  start = time.perf_counter()
  next(resumed)
  resume = time.perf_counter() - start

  print(f"device: {jax.devices()[0].device_kind} x{jax.local_device_count()} "
        f"({jax.default_backend()}); jax {jax.__version__}, tensorflow {tf.__version__}")
  print(f"latents {size}x{size}x{channels} float16 + {config.model.text_encoder.max_length} ids, "
        f"{_NUM_FILES.value} files x {_PER_FILE.value}, global batch {batch}, shuffle buffer "
        f"{config.data.shuffle_buffer}, files per window {config.data.files_per_window}")
  print(f"first batch: {first:.2f} s")
  print(f"host throughput: {host:.1f} batches/s ({host * batch:.0f} examples/s)")
  print(f"global jax.Arrays: {device:.1f} batches/s ({device * batch:.0f} examples/s)")
  print(f"resume at batch {resume_at} (mid-window): first batch after {resume:.2f} s")


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main)
