"""Two-step runs of the side-by-side benchmarks (bench/train_throughput.py, bench/sample_latency.py)
on the tiny config, each in a subprocess where tensorflow cannot be imported: they run, print
their tables and write positive numbers. The numbers themselves go to BENCHMARKS.md."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

# Runs a bench script with tensorflow made unimportable, then names any tensorflow module loaded.
_RUNNER = """
import runpy, sys
sys.modules["tensorflow"] = None
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
loaded = [m for m, v in sys.modules.items() if m.startswith("tensorflow") and v is not None]
print("TENSORFLOW_MODULES", loaded)
"""


def _run(script, args, tmp_path):
  out = tmp_path / "out.json"
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # one CPU device, not the tests' 8
  proc = subprocess.run([sys.executable, "-c", _RUNNER, script, *args, "--json", str(out)],
                        cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "TENSORFLOW_MODULES []" in proc.stdout, proc.stdout
  return proc.stdout, json.loads(out.read_text())


def test_train_throughput_two_steps(tmp_path):
  stdout, r = _run("bench/train_throughput.py",
                   ["--config", "tiny", "--batch", "2", "--steps", "2", "--peak_size", "256",
                    "--torch_compile", "off"], tmp_path)
  assert f"| ours (jax, jitted train step, attention {r['attention']}) |" in stdout
  assert "| diffusers eager |" in stdout
  assert "unavailable: off" in stdout
  for side in ("ours", "torch_eager"):
    assert r[side]["images_per_second"] > 0 and r[side]["seconds_per_step"] > 0
    assert r[side]["peak_memory_bytes"] is not None
  ours = r["ours"]
  assert r["ours_over_torch_eager"] > 0 and r["matmul_peak_flops_per_device"] > 0
  assert ours["xla_flops_per_image"] > 0 and ours["analytic_flops_per_image"] > 0
  # XLA counts the same matmuls and convolutions plus elementwise work and the optimizer.
  assert 0.5 < ours["xla_flops_per_image"] / ours["analytic_flops_per_image"] < 2  # tiny: no loops
  assert 0 < ours["mfu"] and ours["tflops_per_second_per_device"] > 0


def test_sample_latency_two_steps(tmp_path):
  stdout, r = _run("bench/sample_latency.py",
                   ["--config", "tiny", "--steps", "2", "--batches", "1", "--repeats", "1",
                    "--torch_compile", "off", "--workdir", str(tmp_path)], tmp_path)
  assert (f"| batch | ours s/image ({r['attention']}) | diffusers eager s/image | ours speed-up |"
          in stdout)
  row = r["batches"]["1"]
  for key in ("ours_seconds_per_image", "torch_eager_seconds_per_image", "ours_over_torch_eager"):
    assert row[key] > 0, key
  assert r["steps"] == 2 and r["guidance"] > 1
  assert os.path.isfile(tmp_path / "pipeline" / "unet" / "config.json")


def test_step_profile_classes_both_steps(tmp_path):
  """bench/step_profile.py: our step's traced XLA ops and diffusers' aten ops, classed; the
  convolutions and matmuls of the UNet show up on both sides."""
  stdout, r = _run("bench/step_profile.py", ["--config", "tiny", "--batch", "2", "--steps", "1"],
                   tmp_path)
  assert "| class | ours s/step | diffusers eager s/step |" in stdout
  for side in ("ours", "torch_eager"):
    classes = r[side]["classes"]
    assert r[side]["wall"] > 0
    assert classes.get("convolution", 0) > 0 and classes.get("matmul", 0) > 0, (side, classes)
    assert all(v >= 0 for v in classes.values())


def test_attention_blocks_names_its_tiles_and_times_every_row():
  stdout = _plain_run(["bench/attention_blocks.py", "--batch", "2", "--length", "64", "--heads",
                       "2", "--head_dim", "4", "--blocks_kib", "4,16,64", "--repeats", "1"])
  rows = _table_rows(stdout)
  names = [r[0].strip() for r in rows]
  # 2 images x 64 x 64 float32 logits per head (32 KiB): below that, tiles of one (image, head)
  # row and half the budget (2 KiB: 8 queries; 8 KiB: 32); 64 KiB holds both heads, every image.
  assert names == ["xla", "chunked 4 KiB: 1 (image, head) row(s) x 8 queries",
                   "chunked 16 KiB: 1 (image, head) row(s) x 32 queries",
                   "chunked 64 KiB: 2 head(s) x 2 images x 64 queries", "torch sdpa"], names
  assert all(float(x) > 0 for r in rows for x in r[1:]), stdout


def _table_rows(stdout):
  return [line.split("|")[1:-1] for line in stdout.splitlines() if line.startswith("| ")][1:]


def _bench(args):
  """Runs a bench script on one CPU device; returns the finished process."""
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=600, env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"))


def _plain_run(args):
  """Runs a bench script that must succeed; returns its stdout."""
  proc = _bench(args)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout


def test_optimizer_update_times_ours_and_torch():
  stdout = _plain_run(["bench/optimizer_update.py", "--config", "tiny", "--repeats", "1",
                       "--updates_norm"])
  rows = _table_rows(stdout)
  assert [r[0].strip() for r in rows] == [
      "ours (apply_update)", "ours, norm of optax's updates (before 2026-12-06)",
      "torch clip + AdamW (foreach) + EMA"], stdout
  assert all(float(r[1]) > 0 for r in rows), stdout


def test_group_norm_times_every_implementation():
  stdout = _plain_run(["bench/group_norm.py", "--shapes", "2x4x4x32,1x3x5x64", "--groups", "8",
                       "--repeats", "1"])
  rows = _table_rows(stdout)
  assert [r[0].strip() for r in rows] == ["2x4x4x32", "1x3x5x64"], stdout
  for r in rows:
    times = [float(t) for cell in r[1:] for t in cell.split("/")]
    assert len(times) == 6 and all(t > 0 for t in times), stdout


def test_sample_pieces_times_each_piece_on_both_sides(tmp_path):
  stdout, r = _run("bench/sample_pieces.py",
                   ["--config", "tiny", "--batches", "1", "--repeats", "1"], tmp_path)
  assert "| images | piece | ours ms | diffusers eager ms | ours speed-up |" in stdout
  row = r["batches"]["1"]
  assert set(row) == {"text_encoder", "unet", "vae_decode"}
  for piece, v in row.items():
    assert v["ours_ms"] > 0 and v["torch_eager_ms"] > 0 and v["ours_over_torch_eager"] > 0, piece
    assert f"| 1 | {piece} |" in stdout


def test_dot_forms_times_three_products_per_shape():
  stdout = _plain_run(["bench/dot_forms.py", "--shapes", "8x4x3,5x6x7", "--repeats", "1"])
  rows = _table_rows(stdout)
  assert [r[0].strip() for r in rows] == ["8x4x3", "5x6x7"], stdout
  for r in rows:
    assert len(r) == 4, stdout  # shape, forward, input gradient, kernel gradient
    for cell in r[1:]:
      times, ratio = cell.split("(")[0], float(cell.rsplit(",", 1)[1])
      assert all(float(t) > 0 for t in times.split("/")) and ratio > 0, stdout


def test_dot_forms_rejects_a_malformed_shape():
  proc = _bench(["bench/dot_forms.py", "--shapes", "8x4"])
  assert proc.returncode != 0 and "ROWSxINxOUT" in proc.stderr, proc.stderr[-2000:]


def test_steps_per_call_times_both_forms():
  stdout = _plain_run(["bench/steps_per_call.py", "--config", "tiny", "--batch", "1", "--k", "2",
                       "--calls", "1"])
  rows = _table_rows(stdout)
  assert [r[0].strip() for r in rows] == ["one step per call (the trainer's)",
                                          "2 steps unrolled in one call"], stdout
  assert all(float(r[1]) > 0 and float(r[2]) >= 0 and float(r[3]) >= 0 for r in rows), stdout
  assert "one per call / unrolled:" in stdout, stdout
