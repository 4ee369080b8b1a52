"""FID with the shapes feature network separates checkpoints of the demo's LDM.

  make demo   # workdirs/demo/ldm: checkpoints at steps 500 and 700 (checkpoint_every=500)
  python -m latent_diffusion_jax.cli.train_shapes_features --out weights/shapes_features.msgpack
  python bench/shapes_fid.py --workdir workdirs/demo/ldm --num_images 1000

Rows of the printed table (FID and precision/recall against one reference):
  training images     the run's own training images: the floor ("the data against itself")
  step <early>        images sampled from the earliest kept checkpoint (or --early_step)
  step <last>         images sampled from the latest checkpoint

The reference is `--num_images` fresh draws of the shapes generator that no run trains on (dataset
seed `REFERENCE_SEED`) from `--split`: "train" (default) draws from the training combinations,
"test" from the 12 held-out (color, shape, position) combinations, where the rows also measure
generalization to unseen captions. Generated images use the reference images' captions, so
caption frequencies match.

The demo keeps its checkpoints at steps 500 and 700 (training.checkpoint_every=500,
training.keep_checkpoints=3); for an earlier one train with e.g.
--config.training.checkpoint_every=100 --config.training.keep_checkpoints=10 and
pass --early_step 100.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from latent_diffusion_jax.artifacts import loader  # noqa: E402
from latent_diffusion_jax.artifacts.workdir import read_run  # noqa: E402
from latent_diffusion_jax.data import shapes  # noqa: E402
from latent_diffusion_jax.evaluation.feature_nets import shapes as shapes_net  # noqa: E402
from latent_diffusion_jax.evaluation.metrics.fid import feature_stats, frechet_distance  # noqa: E402
from latent_diffusion_jax.evaluation.metrics.precision_recall import precision_recall  # noqa: E402
from latent_diffusion_jax.sampling.generation import generate  # noqa: E402

REFERENCE_SEED = 4242


def score(net, images, reference_features):
  features = net.extract(images)["features"]
  return {"fid": frechet_distance(feature_stats(features), feature_stats(reference_features)),
          **precision_recall(reference_features, features)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="workdirs/demo/ldm", help="a stage-2 shapes workdir")
  parser.add_argument("--shapes_weights", default=shapes_net.DEFAULT_WEIGHTS)
  parser.add_argument("--num_images", type=int, default=1000)
  parser.add_argument("--split", choices=shapes.SPLITS, default="train")
  parser.add_argument("--early_step", type=int, default=None,
                      help="the early checkpoint (default: the earliest kept)")
  parser.add_argument("--step", type=int, default=None, help="the last checkpoint (default: latest)")
  parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
  parser.add_argument("--guidance_scale", type=float, default=3.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch_size", type=int, default=None)
  parser.add_argument("--out", default=None, help="also write the rows as JSON here")
  args = parser.parse_args(argv)

  net = shapes_net.load(args.shapes_weights)
  ckpt, latest, config, _ = read_run(args.workdir)
  steps = ckpt.all_steps()
  early = args.early_step if args.early_step is not None else steps[0]
  last = args.step if args.step is not None else latest
  size, n = config.model.image_size, args.num_images

  ref_images, captions, _ = shapes.generate_batch(0, n, split=args.split, seed=REFERENCE_SEED,
                                                  image_size=size)
  reference = net.extract(ref_images)["features"]
  train_images, _, _ = shapes.generate_batch(0, n, split="train", seed=config.seed, image_size=size)
  rows = [{"images": "training images", **score(net, train_images, reference), "seconds": 0.0}]
  for step in dict.fromkeys([early, last]):
    t0 = time.perf_counter()
    bundle = loader.load_bundle(loader.Source(args.workdir, kind="workdir", step=step))
    images = generate(bundle, captions, seed=args.seed, num_steps=args.steps,
                      guidance_scale=args.guidance_scale, sampler="ddim", batch_size=args.batch_size)
    rows.append({"images": f"step {step}", **score(net, images, reference),
                 "seconds": round(time.perf_counter() - t0, 1)})
    print(f"step {step}: {rows[-1]}", flush=True)

  print(f"\nShapes-feature FID, {n} images vs {n} fresh {args.split}-split draws "
        f"(DDIM {args.steps}, guidance {args.guidance_scale}); kept checkpoints {steps}\n")
  print("| images | FID | precision | recall | seconds |\n|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['images']} | {r['fid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
          f"{r['seconds']} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"rows": rows, "args": vars(args), "kept_steps": steps}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
