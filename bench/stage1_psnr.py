r"""Stage-1 benchmark: trains the embedded default autoencoder and checks its held-out PSNR.

  .venv/bin/python bench/stage1_psnr.py --workdir /tmp/stage1_bench [--min_psnr 30]

Runs `configs/shapes_autoencoder.py` from scratch (the workdir is emptied first; the generated
dataset lives beside it, in <workdir>_data, and is made before the clock starts), prints held-out
PSNR / SSIM and the wall time of the run (compile, training, evaluation), and exits non-zero when
PSNR < --min_psnr. Same as
`python train.py --config configs/shapes_autoencoder.py --workdir W`, which prints the PSNR at the
end too. Extra `--config.<key>=<value>` arguments override the config. CPU, about 4 minutes on 2
quiet cores; too slow for the test suite.
"""

import argparse
import json
import os
import shutil
import sys
import time

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="/tmp/stage1_bench")
  parser.add_argument("--min_psnr", type=float, default=30.0)
  args, overrides = parser.parse_known_args(argv)
  sys.path.insert(0, _ROOT)
  from latent_diffusion_jax.core.config import load_config_file
  from latent_diffusion_jax.training.run import run_training
  config = load_config_file(os.path.join(_ROOT, "configs", "shapes_autoencoder.py"))
  for item in overrides:
    key, _, value = item.removeprefix("--config.").partition("=")
    *path, leaf = key.split(".")
    node = config
    for p in path:
      node = node[p]
    node[leaf] = value.lower() == "true" if isinstance(node[leaf], bool) else type(node[leaf])(value)
  # A fresh run each time, but the generated dataset is reused.
  if not config.data.data_dir:
    config.data.data_dir = args.workdir.rstrip("/") + "_data"
  shutil.rmtree(args.workdir, ignore_errors=True)
  from latent_diffusion_jax.data.batches import load_shapes_split
  load_shapes_split(config, args.workdir, None, "train")  # generate before timing
  start = time.perf_counter()
  result = run_training(config, args.workdir)
  wall = time.perf_counter() - start
  with open(os.path.join(args.workdir, "stage1.json")) as f:
    summary = json.load(f)
  line = (f"stage1 PSNR {summary['psnr']:.2f} dB, SSIM {summary['ssim']:.4f} after "
          f"{result['step']} steps; wall {wall:.0f} s (compile, training, evaluation)")
  print(line, flush=True)
  return 0 if summary["psnr"] >= args.min_psnr else 1


if __name__ == "__main__":
  sys.exit(main())
