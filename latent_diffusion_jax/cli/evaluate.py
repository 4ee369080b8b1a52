"""`python -m latent_diffusion_jax.evaluate`: FID, Inception Score, precision/recall and CLIP score
of a model (any weight source) or of a folder of images; the work is evaluation/run.py's.

  python -m latent_diffusion_jax.evaluate --checkpoint workdirs/demo/ldm \
      --captions captions.txt --num_images 1000 --reference_images held_out/ \
      --features shapes --metrics fid,is,precision_recall --steps 50 --guidance_scale 3 --out eval/
  python -m latent_diffusion_jax.evaluate --diffusers /models/sd2-base \
      --captions captions_val2014.json --num_images 30000 --reference_stats val2014_512.npz \
      --features inception --inception_weights weights/pt_inception.msgpack \
      --clip /models/ViT-H-14 --metrics fid,clip --steps 50 --guidance_scale 8 --out eval/mlperf
  python -m latent_diffusion_jax.evaluate --images other_system/ --captions captions.txt ...

Writes <out>/metrics.json, <out>/metrics.md, keeps the generated images in <out>/generated/
(an interrupted run resumes at the first missing shard) and caches the reference statistics in
<out>.
"""

from absl import app, flags

from latent_diffusion_jax.cli import errors, source_flags
from latent_diffusion_jax.core import errors as errors_lib
from latent_diffusion_jax.diffusion.samplers import SAMPLERS
from latent_diffusion_jax.evaluation.features import FEATURE_NETS
from latent_diffusion_jax.evaluation.scoring import METRICS

source_flags.define()
_CAPTIONS = flags.DEFINE_string("captions", None, "Captions: a text file (one per line) or a COCO "
                                "captions JSON (a fixed subset of --num_images is used).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", None, "Images to generate (default: one per "
                                   "caption); with --images, the first N of the folder.")
_IMAGES = flags.DEFINE_string("images", None, "Score this folder of images (sorted by file name, "
                              "paired with --captions in that order) instead of generating.")
_REFERENCE_IMAGES = flags.DEFINE_string("reference_images", None, "A folder of real images.")
_REFERENCE_STATS = flags.DEFINE_string("reference_stats", None, "A .npz of mu and sigma "
                                       "(pytorch-fid / clean-fid format) of real images.")
_FEATURES = flags.DEFINE_enum("features", "inception", list(FEATURE_NETS), "Feature network.")
_INCEPTION_WEIGHTS = flags.DEFINE_string("inception_weights", None, "FID Inception weights.")
_SHAPES_WEIGHTS = flags.DEFINE_string("shapes_weights", None, "Shapes feature network weights "
                                      "(default weights/shapes_features.msgpack).")
_CLIP = flags.DEFINE_string("clip", None, "A CLIP model for the CLIP score: a transformers "
                            "CLIPModel directory or an open_clip checkpoint.")
_CLIP_MODEL_NAME = flags.DEFINE_string("clip_model_name", None, "The open_clip architecture of "
                                       "--clip (e.g. ViT-H-14) when no config lies beside it.")
_METRICS = flags.DEFINE_string("metrics", "fid", f"Comma separated, of {', '.join(METRICS)}.")
_SAMPLER = flags.DEFINE_enum("sampler", "ddim", list(SAMPLERS), "The sampler.")
_STEPS = flags.DEFINE_integer("steps", 50, "Denoising steps.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 7.5, "Classifier-free guidance; <= 1 disables.")
_ETA = flags.DEFINE_float("eta", 0.0, "DDIM noise (0 = deterministic).")
_SEED = flags.DEFINE_integer("seed", 0, "Image i starts from fold_in(PRNGKey(seed), i).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Images per sampling call "
                                   "(default 4/device).")
_FEATURE_BATCH = flags.DEFINE_integer("feature_batch_size", 50, "Images per feature network call.")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 1000, "Generated images per shard file.")
_MAX_NEW_SHARDS = flags.DEFINE_integer("max_new_shards", None, "Stop after generating this many "
                                       "shards (a time-boxed job); rerun to continue.")
_OUT = flags.DEFINE_string("out", "eval", "Output directory.")


@errors.exits_on_user_error("evaluate")
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from latent_diffusion_jax.core.logs import quiet_libraries
  from latent_diffusion_jax.evaluation.run import run_evaluation
  quiet_libraries()
  if _IMAGES.value:
    given = [f"--{n}" for n in source_flags.SOURCE_FLAGS if flags.FLAGS[n].value is not None]
    if given:
      raise errors_lib.FlagError(f"--images scores a folder; it takes no model ({', '.join(given)})")
    source = None
  else:
    source = source_flags.source_from_flags()
  result = run_evaluation(
      out_dir=_OUT.value, source=source, images=_IMAGES.value, captions=_CAPTIONS.value,
      num_images=_NUM_IMAGES.value, reference_images=_REFERENCE_IMAGES.value,
      reference_stats=_REFERENCE_STATS.value, features=_FEATURES.value,
      inception_weights=_INCEPTION_WEIGHTS.value, shapes_weights=_SHAPES_WEIGHTS.value,
      clip=_CLIP.value, clip_model_name=_CLIP_MODEL_NAME.value,
      allow_pickle=bool(flags.FLAGS.allow_pickle), metrics=_METRICS.value, sampler=_SAMPLER.value, num_steps=_STEPS.value,
      guidance_scale=_GUIDANCE.value, eta=_ETA.value, seed=_SEED.value,
      batch_size=_BATCH_SIZE.value, feature_batch_size=_FEATURE_BATCH.value,
      shard_size=_SHARD_SIZE.value, max_new_shards=_MAX_NEW_SHARDS.value)
  if result is None:
    print(f"Stopped after {_MAX_NEW_SHARDS.value} new shards; run again to continue.")
  else:
    print(open(result["paths"]["md"]).read(), end="")


def run():
  app.run(main)
