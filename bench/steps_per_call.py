"""What XLA:CPU's fresh temporaries cost the train step: our step one per call (as the trainer runs
it) against K steps unrolled into one call, same state, batch and weights (bench/train_throughput.py's
cpu_small setup), with the system time and page faults per step of each.

Every call of a compiled step allocates its temporary buffer anew (785 MB for cpu_small at batch 4),
and glibc serves it from a fresh mapping when the allocating thread is not the main one, whatever
its mmap tunables: each call faults every page in again. K steps in one call fault it in once. This
is a measurement of that cost, not a mode of the trainer; K unrolled steps compile K times longer.

  python bench/steps_per_call.py --config cpu_small --batch 4 --k 2 --calls 3
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from latent_diffusion_jax.cli import huge_pages  # noqa: E402

if __name__ == "__main__":  # as train.py runs: see cli/huge_pages.py
  huge_pages.reexec_with_huge_pages()

import argparse  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import side_by_side as sbs  # noqa: E402  (also puts the repo on sys.path)
import train_throughput as tt  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def _per_step(run, steps):
  """Wall seconds, system seconds and minor page faults per step of `run()` (which runs `steps`)."""
  before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  run()
  wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
  return (wall / steps, (after.ru_stime - before.ru_stime) / steps,
          (after.ru_minflt - before.ru_minflt) / steps)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sbs.add_common_flags(parser)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--k", type=int, default=2, help="steps unrolled into one call")
  parser.add_argument("--calls", type=int, default=3, help="timed calls of the K-step function")
  args = parser.parse_args(argv)
  if args.k < 2 or args.calls < 1:
    raise SystemExit("--k must be at least 2 and --calls at least 1")
  config = sbs.configure(args)
  config.training.batch_size = args.batch
  unet, _, params = tt.unet_pair(config)
  built = tt.build_ours(config, unet, params, tt.host_batch(config, args.batch))
  one_step, sync, step = built["one_step"], built["sync"], built["step"]
  steps = args.k * args.calls

  sync(one_step())
  single = _per_step(lambda: [sync(one_step()) for _ in range(steps)], steps)

  def k_steps(state, batches, *extra):
    def body(state, batch):
      state, metrics = step(state, batch, *extra)
      return state, metrics["loss"]
    return jax.lax.scan(body, state, batches, unroll=True)

  batches = jax.tree.map(lambda x: jnp.stack([x] * args.k), built["batch"])
  holder = {"state": built["holder"].pop("state")}
  started = time.perf_counter()
  compiled = jax.jit(k_steps, donate_argnums=(0,)).lower(
      holder["state"], batches, *built["extra"]).compile()
  compile_s = time.perf_counter() - started

  def call():
    holder["state"], losses = compiled(holder["state"], batches, *built["extra"])
    return losses[-1]

  sync(call())
  unrolled = _per_step(lambda: [sync(call()) for _ in range(args.calls)], steps)
  env = sbs.environment()
  print(f"steps per call, config {args.config}, batch {args.batch}, {steps} steps each; "
        f"{env['date']}; {env['machine']}; jax {env['jax']}; glibc huge pages "
        f"{'on' if env['glibc_huge_pages'] else 'off'}")
  print("| ours | s/step | system s/step | page faults/step |")
  print("|---|---|---|---|")
  for name, (wall, system, faults) in (("one step per call (the trainer's)", single),
                                       (f"{args.k} steps unrolled in one call", unrolled)):
    print(f"| {name} | {wall:.3f} | {system:.3f} | {faults:.0f} |")
  print(f"one per call / unrolled: {single[0] / unrolled[0]:.2f}x; the {args.k}-step function "
        f"compiled in {compile_s:.0f} s")


if __name__ == "__main__":
  main()
