"""Pre-encodes WebDataset image+caption tar shards into latent shards for stage-2 training.

  python -m latent_diffusion_jax.cli.encode --config configs/sd15.py \
      --config.frozen.vae=/models/sd15/vae --config.frozen.tokenizer=/models/sd15/tokenizer \
      --input 'gs://bucket/laion/{00000..00127}.tar' --output gs://bucket/laion-latents-512

Run the same command on every host of a pod slice: each encodes its share of the shards. Re-running
it resumes (finished output shards are skipped). Settings: the config's `encode` section, e.g.
`--config.encode.min_image_size=512 --config.encode.max_unsafe=0.5`. Train on the result with
`--config.data.kind=latent_shards --config.data.latent_shards=gs://bucket/laion-latents-512`.
Aspect-ratio buckets: `--config.data.buckets='((512,512),(384,640),(640,384))'` here and in
training (docs/BUCKETS.md).
"""

from absl import app, flags
from ml_collections import config_flags

from latent_diffusion_jax.cli import errors
from latent_diffusion_jax.core import logs, parallel
from latent_diffusion_jax.data import buckets, encoder_job
from latent_diffusion_jax.training import frozen

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_INPUT = flags.DEFINE_multi_string("input", None,
                                   "Tar shards: path, glob or brace pattern; repeatable.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the latent shards (local or gs://).")
flags.mark_flags_as_required(["config", "input", "output"])


@errors.exits_on_user_error("encode")
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.quiet_libraries()
  parallel.initialize_distributed()
  encoder_job.plan_inputs(_INPUT.value)  # bad patterns fail before the models load
  buckets.check_buckets(_CONFIG.value)  # so do bucket sizes the models cannot take
  encoder, tokenizer, scale = frozen.build_encoder(_CONFIG.value)
  summary = encoder_job.encode_shards(_CONFIG.value, _INPUT.value, _OUTPUT.value, encoder=encoder,
                                      tokenizer=tokenizer, scale_factor=scale)
  encoder_job.check_kept(summary)


if __name__ == "__main__":
  app.run(main)
