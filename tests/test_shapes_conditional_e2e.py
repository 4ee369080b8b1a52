"""The class-conditional and layout-to-image shapes pipelines end to end, as a user runs them:
train.py for 2 steps (tiny configs, random first stage), then the shapes_demo evaluator sampling
every class / held-out layouts from the checkpoint."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _run(args, returncode=0):
  """Runs `python args...` from the repo root on 2 fake devices; fails unless it exits with
  `returncode`."""
  env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"].replace(
      "--xla_force_host_platform_device_count=8", "--xla_force_host_platform_device_count=2"))
  proc = subprocess.run([sys.executable] + args, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=900)
  if proc.returncode != returncode:
    raise AssertionError(f"{args} exited ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-6000:]}")
  return proc


@pytest.mark.parametrize("task", ["class", "layout"])
def test_train_two_steps_and_evaluate(task, tmp_path):
  workdir, out = str(tmp_path / task), str(tmp_path / "eval")
  _run(["train.py", "--config", f"configs/shapes_{task}_ldm.py:tiny", "--workdir", workdir,
        f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.training.sample_every=0"])
  assert "2" in os.listdir(os.path.join(workdir, "checkpoints"))
  count = ["--images_per_class=1"] if task == "class" else ["--num_layouts=4"]
  proc = _run(["-m", "latent_diffusion_jax.evaluation.shapes_demo", "--task", task,
               "--checkpoint", workdir, "--out", out, "--steps=2", *count])
  scores = json.load(open(os.path.join(out, f"{task}_fidelity.json")))
  assert scores["task"] == task and 0.0 <= scores["accuracy"] <= 1.0
  if task == "class":
    assert scores["num_examples"] == 18 and "Class fidelity on 18 images" in proc.stdout
  else:
    assert scores["num_examples"] == 4 and scores["num_boxes"] == len(
        [o for objects in scores["per_example"] for o in objects])
    assert "Layout fidelity on" in proc.stdout
  assert os.path.isfile(os.path.join(out, "grid.png"))
