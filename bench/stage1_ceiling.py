"""What a first stage lets the caption-fidelity detector read: color, position and shape of the
held-out test shapes read from the autoencoder's reconstructions, beside the same read from the
real images (the detector's own ceiling), with shape split by the shapes' size.

  python bench/stage1_ceiling.py --workdir workdirs/demo/autoencoder [--workdir ...] [--num_images 384]

A stage-2 model decodes through this autoencoder, so its shape accuracy in `make demo` cannot go
much past what this prints for its first stage (BENCHMARKS.md, "What limits shape").
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from latent_diffusion_jax.data import shapes  # noqa: E402
from latent_diffusion_jax.evaluation.caption_fidelity import caption_fidelity  # noqa: E402

SIZES = ("small", "large")


def read_line(name: str, scores: dict, sizes: np.ndarray) -> str:
  ok = np.array([e["shape"] for e in scores["per_example"]], dtype=bool)
  by_size = ", ".join(f"{s} {ok[sizes == s].mean():.1%}" for s in SIZES if (sizes == s).any())
  return (f"{name}: color {scores['color']:.1%}, position {scores['position']:.1%}, "
          f"shape {scores['shape']:.1%} ({by_size})")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", action="append", required=True,
                      help="A stage-1 (autoencoder) workdir; repeat to compare several.")
  parser.add_argument("--num_images", type=int, default=384,
                      help="Held-out test images (the shapes test split's first N).")
  parser.add_argument("--batch", type=int, default=128)
  args = parser.parse_args(argv)
  import jax
  import jax.numpy as jnp
  from latent_diffusion_jax.artifacts.workdir import load_first_stage

  examples = [shapes.generate_example(i, split="test") for i in range(args.num_images)]
  images = np.stack([e[0] for e in examples])
  attributes = [e[2] for e in examples]
  sizes = np.array([a["size"] for a in attributes])
  print(read_line("real images", caption_fidelity(images, attributes), sizes), flush=True)
  for workdir in args.workdir:
    vae, params, _ = load_first_stage(workdir)
    reconstruct = jax.jit(lambda x: vae.apply({"params": params}, x)[0])
    out = []
    for i in range(0, len(images), args.batch):
      x = jnp.asarray(images[i:i + args.batch].astype(np.float32) / 127.5 - 1.0)
      out.append(np.asarray(reconstruct(x)))
    recon = np.clip((np.concatenate(out) + 1.0) / 2.0, 0.0, 1.0)
    print(read_line(workdir, caption_fidelity(recon, attributes), sizes), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
