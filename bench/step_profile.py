"""Where the train step's time goes, ours beside diffusers', by kind of work: a jax.profiler trace
of our compiled step (XLA:CPU thunk events, each named by its HLO instruction and classed by what
the instruction computes) and a torch.profiler table of diffusers' eager step (aten ops by name),
same UNet, weights and batch as bench/train_throughput.py.

  python bench/step_profile.py --config cpu_small --batch 4 --steps 3 [--top 5]

Classes: convolution, matmul (dot), attention (ours: softmax exponentials and everything inside
the chunked-attention loops; theirs: the fused scaled_dot_product kernels), normalization (torch
only: XLA fuses GroupNorm into elementwise work), optimizer (torch only: XLA fuses it likewise),
elementwise / other. Times are per step; a class's time is the sum of its ops' durations, which
can exceed the step's wall time where ops run on both cores at once.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from latent_diffusion_jax.cli import huge_pages  # noqa: E402

if __name__ == "__main__":  # as train.py runs: see cli/huge_pages.py
  huge_pages.reexec_with_huge_pages()

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import side_by_side as sbs  # noqa: E402
import train_throughput as tt  # noqa: E402

import jax  # noqa: E402

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?:^|\s)([a-z][a-z0-9_\-]*)\(")
_CALLS = re.compile(r"(?:calls|body|to_apply)=%?([\w.\-]+)")
CONTAINERS = ("while", "call", "conditional")


def parse_hlo(text: str):
  """{instruction: (computation, opcode, [called computations])} and {computation: [ops]}."""
  instructions, members, computation = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    stripped = line.strip()
    if stripped.endswith("{") and " = " not in stripped:
      computation = stripped.split()[0].lstrip("%")
      if computation == "ENTRY":
        computation = stripped.split()[1].lstrip("%")
      continue
    m = _INSTRUCTION.match(line)
    if not m or computation is None:
      continue
    name, rest = m.groups()
    op = _OPCODE.search(rest)
    instructions[name] = (computation, op.group(1) if op else "?", _CALLS.findall(rest))
    members[computation].append(name)
  return instructions, members


def classify_ours(instructions, members):
  """{instruction: class} for every instruction of the module."""
  loop_computations = set()
  frontier = []
  for _, opcode, called in instructions.values():
    if opcode == "while":
      frontier.extend(called)
  while frontier:  # everything a while loop runs, transitively
    c = frontier.pop()
    if c in loop_computations:
      continue
    loop_computations.add(c)
    for n in members.get(c, ()):
      frontier.extend(instructions[n][2])

  def content(name, seen):
    _, opcode, called = instructions[name]
    ops = {opcode}
    for c in called:
      if c not in seen:
        seen.add(c)
        for n in members.get(c, ()):
          ops |= content(n, seen)
    return ops

  classes = {}
  for name, (computation, opcode, _) in instructions.items():
    if opcode in CONTAINERS:
      classes[name] = None  # its body's ops are traced themselves
      continue
    ops = content(name, set())
    if computation in loop_computations:
      classes[name] = "attention"
    elif "convolution" in ops:
      classes[name] = "convolution"
    elif "exponential" in ops:
      classes[name] = "attention"
    elif "dot" in ops:
      classes[name] = "matmul"
    else:
      classes[name] = "elementwise / other"
  return classes


def trace_events(log_dir: str):
  path = sorted(glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
  with gzip.open(path) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  return [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]


def profile_ours(built, steps: int):
  one_step, sync, executable = built["one_step"], built["sync"], built["executable"]
  sync(one_step())
  classes = classify_ours(*parse_hlo(executable.as_text()))
  with tempfile.TemporaryDirectory() as log_dir:
    jax.profiler.start_trace(log_dir, create_perfetto_trace=True)
    start = time.perf_counter()
    for _ in range(steps):
      sync(one_step())
    wall = (time.perf_counter() - start) / steps
    jax.profiler.stop_trace()
    events = trace_events(log_dir)
  by_class, by_op = collections.Counter(), collections.Counter()
  for e in events:
    op = e["args"]["hlo_op"]
    cls = classes.get(op, "elementwise / other")
    if cls is None:
      continue
    seconds = e["dur"] * 1e-6 / steps
    by_class[cls] += seconds
    by_op[(op, cls)] += seconds
  return wall, by_class, by_op


def classify_torch(name: str) -> str:
  n = name.lower()
  if "scaled_dot_product" in n or "flash_attention" in n or "softmax" in n:
    return "attention"
  if "conv" in n:
    return "convolution"
  if any(k in n for k in ("addmm", "bmm", "aten::mm", "matmul", "linear", "baddbmm")):
    return "matmul"
  if "norm" in n and "clip" not in n:
    return "normalization"
  if "_foreach" in n or "adam" in n or "optimizer" in n or "clip_grad" in n:
    return "optimizer"
  return "elementwise / other"


def profile_torch(one_step, sync, steps: int):
  import torch
  sync(one_step())
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    start = time.perf_counter()
    for _ in range(steps):
      sync(one_step())
    wall = (time.perf_counter() - start) / steps
  by_class, by_op = collections.Counter(), collections.Counter()
  for avg in prof.key_averages():
    seconds = avg.self_cpu_time_total * 1e-6 / steps
    cls = classify_torch(avg.key)
    by_class[cls] += seconds
    by_op[(avg.key, cls)] += seconds
  return wall, by_class, by_op


CLASSES = ("convolution", "matmul", "attention", "normalization", "optimizer", "elementwise / other")


def table(ours, theirs, top: int) -> str:
  (w_ours, c_ours, o_ours), (w_theirs, c_theirs, o_theirs) = ours, theirs
  lines = ["| class | ours s/step | diffusers eager s/step |", "|---|---|---|"]
  for cls in CLASSES:
    lines.append(f"| {cls} | {c_ours.get(cls, 0.0):.3f} | {c_theirs.get(cls, 0.0):.3f} |")
  lines.append(f"| sum of op times | {sum(c_ours.values()):.3f} | {sum(c_theirs.values()):.3f} |")
  lines.append(f"| step wall time | {w_ours:.3f} | {w_theirs:.3f} |")
  for label, ops in (("ours", o_ours), ("diffusers eager", o_theirs)):
    for cls in CLASSES:
      top_ops = [(op, t) for (op, c), t in ops.most_common() if c == cls][:top]
      if top_ops:
        lines += ["", f"{label}, {cls}: top {len(top_ops)} ops, s/step"]
        lines += [f"  {t:.4f}  {op}" for op, t in top_ops]
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sbs.add_common_flags(p)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--steps", type=int, default=3, help="profiled steps per side (after one untimed)")
  p.add_argument("--top", type=int, default=5, help="ops listed per class and side")
  args = p.parse_args(argv)
  config = sbs.configure(args)
  config.training.batch_size = args.batch
  unet, model, params = tt.unet_pair(config)
  host = tt.host_batch(config, args.batch)
  ours = profile_ours(tt.build_ours(config, unet, params, host), args.steps)
  theirs = profile_torch(*tt.build_torch(config, model, host, args.dtype, False), args.steps)
  env = sbs.environment()
  print(f"train step profile, config {args.config}, batch {args.batch}, {args.dtype}, attention "
        f"{config.model.attention_impl}, {args.steps} steps; {env['date']}; {env['machine']}; "
        f"jax {env['jax']}, torch {env['torch']}, diffusers {env['diffusers']}")
  print(table(ours, theirs, args.top), flush=True)
  sbs.write_json(args.json, {"benchmark": "step_profile", "config": args.config, **env,
                             "ours": {"wall": ours[0], "classes": dict(ours[1])},
                             "torch_eager": {"wall": theirs[0], "classes": dict(theirs[1])}})


if __name__ == "__main__":
  main()
