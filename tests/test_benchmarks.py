"""Smoke runs of the benchmarks in bench/ at tiny sizes: they run and print their tables. The
numbers themselves are measured and recorded in BENCHMARKS.md, not checked here."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def test_load_memory_runs_and_prints_its_table(tmp_path):
  """bench/load_memory.py: writes a tiny stage-2 checkpoint, then measures a partial and a full
  restore, each in a fresh process."""
  proc = subprocess.run(
      [sys.executable, "bench/load_memory.py", "--unet_channels", "32,64", "--layers_per_block",
       "1", "--workdir", str(tmp_path)],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = proc.stdout.splitlines()
  assert ("| load | weights | checkpoint on disk | read | peak extra RSS | peak / weights | "
          "seconds |") in lines
  rows = [line for line in lines if line.startswith(("| partial:", "| full:"))]
  assert len(rows) == 2 and all(row.count("|") == 8 for row in rows), proc.stdout
  assert any(line.startswith("full / partial peak extra RSS:") for line in lines)
  assert os.path.isdir(tmp_path / "workdir" / "checkpoints" / "1")
