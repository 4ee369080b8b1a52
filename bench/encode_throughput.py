r"""Encode throughput: images/s from WebDataset tar shards to written latent shards.

  .venv/bin/python bench/encode_throughput.py --config configs/sd15.py:tiny --resolution 32
  python bench/encode_throughput.py --config configs/sd15.py --resolution 512 \
      --config.model.dtype=bfloat16 --config.encode.batch_size=256 --num_shards 8 --per_shard 1024

Writes synthetic LAION-layout shards first (noisy smooth JPEGs, --source_size pixels square, so
decoding costs about what photos cost; shapes captions; full json), outside the clock. Then:
  1. host pipeline alone: tar reading + JPEG decoding + resize/crop through tf.data (images/s),
  2. unless --host_only, the whole job, timed after a warm-up job that compiles the encoder:
     `encode_shards` from the tars to committed latent shards (images/s), as
     `python -m latent_diffusion_jax.cli.encode` runs it.
Models are random unless --config.frozen.vae / --config.frozen.text_encoder name real ones (the
cost does not depend on the weights). Extra `--config.<key>=<value>` flags override the config.
"""

import os
import shutil
import sys
import tempfile
import time

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_RESOLUTION = flags.DEFINE_integer("resolution", None, "Crop side (sets model.image_size too).")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 4, "Synthetic tar shards to encode.")
_PER_SHARD = flags.DEFINE_integer("per_shard", 128, "Samples per shard.")
_SOURCE_SIZE = flags.DEFINE_integer("source_size", 0, "Source image side; 0: 1.25 x resolution.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where shards and latents go; default a temp dir.")
_HOST_ONLY = flags.DEFINE_bool("host_only", False, "Measure the host pipeline only (no models).")
flags.mark_flags_as_required(["config"])


def synthetic_image(rng, size: int) -> bytes:
  """A JPEG with photo-like entropy: a smooth random field plus sensor-like noise."""
  import io
  import numpy as np
  from PIL import Image
  side = size // 16 + 1
  coarse = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
  smooth = np.asarray(coarse.resize((size, size), Image.BICUBIC), np.float32)
  pixels = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, "JPEG", quality=90)
  return buf.getvalue()


def write_shards(directory: str, num_shards: int, per_shard: int, size: int, seed: int = 0):
  import json
  import numpy as np
  from latent_diffusion_jax.data import shapes, webdataset
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  for s in range(num_shards):
    samples = []
    for i in range(per_shard):
      _, caption, _ = shapes.generate_example(s * per_shard + i, seed=seed, image_size=16)
      meta = {"width": size, "height": size, "similarity": 0.3, "pwatermark": 0.1, "punsafe": 0.01}
      files = {"jpg": synthetic_image(rng, size), "txt": caption.encode(),
               "json": json.dumps(meta).encode()}
      samples.append((f"{s:05d}{i:04d}", files))
    webdataset.write_tar_shard(os.path.join(directory, f"{s:05d}.tar"), samples)
  return os.path.join(directory, f"{{00000..{num_shards - 1:05d}}}.tar")


def main(argv):
  del argv
  import jax
  from latent_diffusion_jax.data import encoder_job, shard_reading, webdataset
  from latent_diffusion_jax.training import frozen
  config = _CONFIG.value
  if _RESOLUTION.value:
    config.model.image_size = config.encode.resolution = _RESOLUTION.value
  resolution = config.encode.resolution or config.model.image_size
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="encode_bench_")
  size = _SOURCE_SIZE.value or int(resolution * 1.25)
  pattern = write_shards(os.path.join(workdir, "shards"), _NUM_SHARDS.value, _PER_SHARD.value, size)
  warmup = write_shards(os.path.join(workdir, "warmup"), 1, 8, size, seed=1)
  total = _NUM_SHARDS.value * _PER_SHARD.value

  prep = webdataset.Preprocessing.from_config(config)
  files = shard_reading.expand_patterns(pattern)
  start = time.perf_counter()
  decoded = sum(1 for r in webdataset.read_samples(
      files, prep, parallel_shards=config.encode.parallel_shards).as_numpy_iterator()
      if not r["status"])
  host = decoded / (time.perf_counter() - start)
  print(f"device: {jax.devices()[0].device_kind} x{jax.local_device_count()} "
        f"({jax.default_backend()}); jax {jax.__version__}; host CPUs {os.cpu_count()}")
  print(f"resolution {resolution}, source {size}x{size} JPEG, {total} images in "
        f"{_NUM_SHARDS.value} shards")
  print(f"host pipeline (read+decode+crop): {host:.1f} images/s")
  if _HOST_ONLY.value:
    return

  encoder, tokenizer, scale = frozen.build_encoder(config)
  for out in ("warmup_latents", "latents"):
    shutil.rmtree(os.path.join(workdir, out), ignore_errors=True)
  encoder_job.encode_shards(config, warmup, os.path.join(workdir, "warmup_latents"),
                            encoder=encoder, tokenizer=tokenizer, scale_factor=scale)
  start = time.perf_counter()
  summary = encoder_job.encode_shards(config, pattern, os.path.join(workdir, "latents"),
                                      encoder=encoder, tokenizer=tokenizer, scale_factor=scale)
  wall = time.perf_counter() - start
  assert summary["kept"] == total, summary
  print(f"encoder batch {encoder.batch_size}, compute {config.model.dtype}, storage "
        f"{config.encode.storage_dtype}, text embeddings {config.encode.store_text_embeddings}")
  print(f"end to end (tar -> latent shards): {total / wall:.1f} images/s ({wall:.2f} s)")


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main)
