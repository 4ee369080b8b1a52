"""Sweeps: point helpers, checks against the base config, a local three-point run and its rerun,
the summary table read back from the runs' event files, and the cluster launch files (run against
stand-ins for srun/scontrol and gcloud/curl, so the exact train.py command of every process is
checked, distributed flags included)."""

import csv
import json
import math
import os
import shlex
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from latent_diffusion_jax.core.errors import FlagError, UserInputError
from latent_diffusion_jax.sweeps import launch_files, points, spec, summary
from latent_diffusion_jax.sweeps.launch_files import LaunchOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "configs", "sweeps", "shapes_lr.py")
RATES = [5e-4, 2e-3, 8e-3]


def _sweep_file(tmp_path, body, base=os.path.join(REPO, "configs", "shapes_autoencoder.py:tiny"),
                name="s.py"):
  path = tmp_path / name
  path.write_text(f"from latent_diffusion_jax.sweeps import points\nBASE_CONFIG = {base!r}\n"
                  + textwrap.dedent(body))
  return str(path)


# --- points ---------------------------------------------------------------------------------------

def test_product_zip_chain():
  grid = points.product({"optimizer.learning_rate": [1e-4, 1e-3]}, seed=[0, 1, 2])
  assert len(grid) == 6
  assert grid[0] == {"optimizer.learning_rate": 1e-4, "seed": 0}
  assert grid[-1] == {"optimizer.learning_rate": 1e-3, "seed": 2}
  pairs = points.zip_({"optimizer.learning_rate": [1e-4, 1e-3], "optimizer.warmup_steps": [5, 50]})
  assert pairs == [{"optimizer.learning_rate": 1e-4, "optimizer.warmup_steps": 5},
                   {"optimizer.learning_rate": 1e-3, "optimizer.warmup_steps": 50}]
  both = points.chain(pairs, {"seed": [7]}, [{"training.batch_size": 16}])
  assert both[2:] == [{"seed": 7}, {"training.batch_size": 16}]
  # A product of a zip with an axis: every pair with every seed.
  assert len(points.product(pairs, seed=[0, 1])) == 4


def test_point_helpers_refuse_bad_parts():
  with pytest.raises(UserInputError, match="equal length"):
    points.zip_({"seed": [0, 1]}, {"optimizer.learning_rate": [1e-4]})
  with pytest.raises(UserInputError, match="set twice"):
    points.product({"seed": [0]}, [{"seed": 1}])
  with pytest.raises(UserInputError, match="list of values"):
    points.product(seed=3)


# --- loading and checking -------------------------------------------------------------------------

def test_example_sweep_loads_with_resolved_configs():
  sweep = spec.load_sweep(EXAMPLE)
  assert sweep.base_config == "configs/shapes_autoencoder.py:tiny"
  assert [p.overrides for p in sweep.points] == [{"optimizer.learning_rate": r} for r in RATES]
  assert [p.dirname for p in sweep.points] == [
      "0-learning_rate=0.0005", "1-learning_rate=0.002", "2-learning_rate=0.008"]
  # Each config is what train.py's flag parsing gives: the override on top of the tiny variant.
  assert [p.config.optimizer.learning_rate for p in sweep.points] == RATES
  assert all(p.config.training.num_steps == 2 and p.config.stage == "autoencoder"
             for p in sweep.points)


def test_values_round_trip_through_train_flags(tmp_path):
  path = _sweep_file(tmp_path, """
      def sweep():
        return [{"model.vae.block_out_channels": (8, 16, 16), "training.async_checkpointing": False,
                 "sampling.prompts": ("a b", "c, 'd'"), "optimizer.learning_rate": 3e-05}]
  """)
  (point,) = spec.load_sweep(path).points
  c = point.config
  assert c.model.vae.block_out_channels == (8, 16, 16)
  assert c.training.async_checkpointing is False
  assert c.sampling.prompts == ("a b", "c, 'd'")
  assert c.optimizer.learning_rate == 3e-05


def test_unknown_key_names_point_and_key(tmp_path):
  path = _sweep_file(tmp_path, """
      def sweep():
        return points.chain([{"seed": 1}], [{"seed": 2, "optimizer.learning_rat": 1e-4}])
  """)
  with pytest.raises(UserInputError) as e:
    spec.load_sweep(path)
  message = str(e.value)
  assert "sweep point 1" in message and "seed=2" in message
  assert "'optimizer.learning_rat'" in message and "did you mean optimizer.learning_rate" in message


@pytest.mark.parametrize("key, value, shown", [
    ("training.batch_size", 0.5, "training.batch_size=0.5 has type float"),
    ("optimizer.learning_rate", "fast", "optimizer.learning_rate='fast' has type str"),
    ("data.kind", 3, "data.kind=3 has type int"),
])
def test_wrong_value_type_names_point_and_key(tmp_path, key, value, shown):
  path = _sweep_file(tmp_path, f"""
      def sweep():
        return [{{"seed": 0}}, {{{key!r}: {value!r}}}]
  """)
  with pytest.raises(UserInputError, match="sweep point 1") as e:
    spec.load_sweep(path)
  assert shown in str(e.value)


def test_section_and_bad_file_errors(tmp_path):
  with pytest.raises(UserInputError, match="'optimizer' is a section"):
    spec.load_sweep(_sweep_file(tmp_path, "def sweep():\n  return [{'optimizer': 1}]\n"))
  with pytest.raises(FileNotFoundError, match="BASE_CONFIG 'configs/nope.py' not found"):
    spec.load_sweep(_sweep_file(tmp_path, "def sweep():\n  return [{}]\n", base="configs/nope.py"))
  with pytest.raises(UserInputError, match="non-empty list"):
    spec.load_sweep(_sweep_file(tmp_path, "def sweep():\n  return []\n"))


def test_cli_reports_a_bad_point_without_traceback(tmp_path):
  path = _sweep_file(tmp_path, "def sweep():\n  return [{'training.batch_sise': 4}]\n")
  proc = subprocess.run([sys.executable, "-m", "latent_diffusion_jax.cli.sweep", f"--sweep={path}",
                         f"--root={tmp_path / 'r'}"], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 1
  assert "sweep point 0" in proc.stderr and "'training.batch_sise'" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "r").exists()


# --- launch files ---------------------------------------------------------------------------------

def _expected_args(workdir_root, dirname, rate):
  return ["--config=configs/shapes_autoencoder.py:tiny", f"--workdir={workdir_root}/{dirname}",
          f"--config.optimizer.learning_rate={rate!r}"]


def _executable(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _fake_bin(tmp_path):
  """Stand-ins: `fakepython` logs its argv as JSON lines; srun runs its command once per task
  with SLURM_PROCID; gcloud answers `describe` with an IP and runs an ssh --command on each worker
  with curl answering the metadata server's worker number."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "calls.jsonl"
  _executable(bin_dir / "fakepython", f"""#!{sys.executable}
import json, os, sys
with open({str(log)!r}, "a") as f:
  f.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd()}}) + "\\n")
""")
  _executable(bin_dir / "scontrol", "#!/bin/bash\nprintf 'node-a\\nnode-b\\n'\n")
  _executable(bin_dir / "srun", """#!/bin/bash
n=1
while [[ "$1" == --* ]]; do [[ "$1" == --ntasks=* ]] && n="${1#--ntasks=}"; shift; done
for ((i = 0; i < n; i++)); do SLURM_PROCID=$i SLURM_NTASKS=$n "$@" || exit 1; done
""")
  _executable(bin_dir / "gcloud", """#!/bin/bash
if [[ "$4" == describe ]]; then echo 10.1.2.3; exit 0; fi
for a in "$@"; do [[ "$a" == --command=* ]] && cmd="${a#--command=}"; done
for w in 0 1; do WORKER=$w bash -c "$cmd" || exit 1; done
""")
  _executable(bin_dir / "curl", "#!/bin/bash\necho $WORKER\n")
  return bin_dir, log


def _calls(log):
  return [json.loads(line) for line in log.read_text().splitlines()]


def test_slurm_array_job(tmp_path):
  sweep = spec.load_sweep(EXAMPLE)
  options = LaunchOptions("slurm", workdir_root="/shared/lr", nodes=2, gpus_per_node=8,
                          partition="gpu", time_limit="4:00:00", max_parallel=2,
                          repo_dir=str(tmp_path), python="fakepython")
  text = launch_files.launch_file(sweep, options)
  sbatch = dict(line[len("#SBATCH "):].split("=", 1) for line in text.splitlines()
                if line.startswith("#SBATCH "))
  assert sbatch == {"--job-name": "sweep-shapes-lr", "--array": "0-2%2", "--nodes": "2",
                    "--ntasks-per-node": "1", "--gpus-per-node": "8", "--partition": "gpu",
                    "--time": "4:00:00", "--output": "/shared/lr/slurm-%A_%a.out"}
  script = tmp_path / "sweep.sbatch"
  script.write_text(text)
  assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
  bin_dir, log = _fake_bin(tmp_path)
  for task, (point, rate) in enumerate(zip(sweep.points, RATES)):
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_ARRAY_TASK_ID=str(task),
               SLURM_JOB_NODELIST="node-[a-b]")
    subprocess.run(["bash", str(script)], env=env, check=True)
    calls = _calls(log)[-2:]
    assert [c["argv"] for c in calls] == [
        ["train.py", *_expected_args("/shared/lr", point.dirname, rate),
         f"--config.distributed.coordinator_address=node-a:{1234 + task}",
         "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}"]
        for pid in (0, 1)]
    assert calls[0]["cwd"] == str(tmp_path)


def test_slurm_single_node_runs_plain_command(tmp_path):
  sweep = spec.load_sweep(EXAMPLE)
  text = launch_files.launch_file(sweep, LaunchOptions("slurm", workdir_root="/w", python="fakepython",
                                                       repo_dir=str(tmp_path)))
  assert "#SBATCH --array=0-2\n" in text and "#SBATCH --nodes=1\n" in text
  script = tmp_path / "one.sbatch"
  script.write_text(text)
  bin_dir, log = _fake_bin(tmp_path)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_ARRAY_TASK_ID="2")
  subprocess.run(["bash", str(script)], env=env, check=True)
  assert [c["argv"] for c in _calls(log)] == [["train.py", *_expected_args("/w", sweep.points[2].dirname, 8e-3)]]


def test_tpu_pod_script(tmp_path):
  sweep = spec.load_sweep(EXAMPLE)
  options = LaunchOptions("tpu", workdir_root="gs://bucket/lr", nodes=2, tpu_name="pod-1",
                          zone="us-central2-b", project="proj", repo_dir=str(tmp_path),
                          python="fakepython")
  text = launch_files.launch_file(sweep, options)
  assert text.count("gcloud compute tpus tpu-vm ssh pod-1 --zone=us-central2-b --project=proj "
                    "--worker=all") == 3
  script = tmp_path / "tpu.sh"
  script.write_text(text)
  bin_dir, log = _fake_bin(tmp_path)
  subprocess.run(["bash", str(script)], env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"),
                 check=True)
  expected = [["train.py", *_expected_args("gs://bucket/lr", p.dirname, rate),
               "--config.distributed.coordinator_address=10.1.2.3:1234",
               "--config.distributed.num_processes=2", f"--config.distributed.process_id={worker}"]
              for p, rate in zip(sweep.points, RATES) for worker in (0, 1)]
  assert [c["argv"] for c in _calls(log)] == expected


def test_jobset_yaml(tmp_path):
  sweep = spec.load_sweep(EXAMPLE)
  options = LaunchOptions("jobset", workdir_root="gs://bucket/lr", nodes=4, gpus_per_node=8,
                          image="registry/ldj:1", job_name="LR_sweep", repo_dir="/app")
  doc = yaml.safe_load(launch_files.launch_file(sweep, options))
  assert doc["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and doc["kind"] == "JobSet"
  assert doc["metadata"]["name"] == "lr-sweep"
  assert doc["spec"]["network"] == {"enableDNSHostnames": True, "subdomain": "lr-sweep"}
  jobs = doc["spec"]["replicatedJobs"]
  assert [j["name"] for j in jobs] == ["p0", "p1", "p2"]
  for job, point, rate in zip(jobs, sweep.points, RATES):
    assert job["replicas"] == 1
    spec_ = job["template"]["spec"]
    assert (spec_["completionMode"], spec_["parallelism"], spec_["completions"]) == ("Indexed", 4, 4)
    (container,) = spec_["template"]["spec"]["containers"]
    assert container["image"] == "registry/ldj:1" and container["workingDir"] == "/app"
    assert container["command"] == ["python", "train.py"]
    assert container["args"] == [
        *_expected_args("gs://bucket/lr", point.dirname, rate),
        f"--config.distributed.coordinator_address=lr-sweep-{job['name']}-0-0.lr-sweep:1234",
        "--config.distributed.num_processes=4",
        "--config.distributed.process_id=$(JOB_COMPLETION_INDEX)"]
    (env,) = container["env"]
    assert env["name"] == "JOB_COMPLETION_INDEX"
    assert "job-completion-index" in env["valueFrom"]["fieldRef"]["fieldPath"]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 8}}


@pytest.mark.parametrize("target, options, flag", [
    ("jobset", dict(workdir_root="/w"), "--image"),
    ("tpu", dict(workdir_root="/w", zone="z"), "--tpu_name"),
    ("tpu", dict(workdir_root="/w", tpu_name="t"), "--zone"),
    ("slurm", dict(), "--workdir"),
])
def test_launch_target_missing_value(target, options, flag):
  sweep = spec.load_sweep(EXAMPLE)
  with pytest.raises(FlagError, match=f"--launch={target} needs {flag}"):
    launch_files.launch_file(sweep, LaunchOptions(target, **options))


def test_cli_writes_launch_file_and_names_missing_flag(tmp_path):
  out = tmp_path / "lr.yaml"
  base = [sys.executable, "-m", "latent_diffusion_jax.cli.sweep", f"--sweep={EXAMPLE}",
          "--launch=jobset", "--workdir=/shared/lr"]
  proc = subprocess.run(base, cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 1 and "--launch=jobset needs --image" in proc.stderr
  subprocess.run([*base, "--image=img", f"--out={out}"], cwd=REPO, check=True, capture_output=True)
  assert len(yaml.safe_load(out.read_text())["spec"]["replicatedJobs"]) == 3


# --- local runs -----------------------------------------------------------------------------------

def _cli(args, **kwargs):
  env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"].replace(
      "--xla_force_host_platform_device_count=8", "--xla_force_host_platform_device_count=1"))
  return subprocess.run([sys.executable, "-m", "latent_diffusion_jax.cli.sweep", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=900, **kwargs)


def _mtimes(root):
  """mtime of every file in the points' workdirs (not the summary files or the hparams view)."""
  out = {}
  for d, _, files in os.walk(root):
    if "hparams" in d.split(os.sep) or d == str(root):
      continue
    for f in files:
      out[os.path.join(d, f)] = os.stat(os.path.join(d, f)).st_mtime_ns
  return out


@pytest.mark.slow
def test_local_sweep_summary_and_rerun(tmp_path):
  # data.num_train changes no compiled computation, so after the first point the others reuse
  # the persistent compilation cache: the test measures the sweep machinery, not XLA.
  path = _sweep_file(tmp_path, """
      def sweep():
        return points.product({"data.num_train": [64, 72, 80]})
  """)
  root = tmp_path / "root"
  start = time.time()
  proc = _cli([f"--sweep={path}", f"--root={root}", "--parallel=2", "--cpu_devices_per_point=1"])
  first = time.time() - start
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert "[3/3]" in proc.stdout and "ETA" in proc.stdout
  names = ["0-num_train=64", "1-num_train=72", "2-num_train=80"]
  assert sorted(p for p in os.listdir(root) if p[0].isdigit()) == names
  for name, n in zip(names, [64, 72, 80]):
    workdir = root / name
    assert json.loads((workdir / "overrides.json").read_text()) == {"data.num_train": n}
    assert json.loads((workdir / "config.json").read_text())["data"]["num_train"] == n
    assert f"--config.data.num_train={n}" in (workdir / "command.txt").read_text()
    assert json.loads((workdir / "sweep_point.json").read_text())["final_step"] == 2

  rows = list(csv.DictReader(open(root / "summary.csv")))
  assert [r["data.num_train"] for r in rows] == ["64", "72", "80"]
  assert {r["status"] for r in rows} == {"done"} and {r["this_run"] for r in rows} == {"trained"}
  for row, name in zip(rows, names):
    # The values come from the runs' own event files.
    scalars = summary.read_scalars(str(root / name))
    assert float(row["loss"]) == pytest.approx(scalars["loss"][1]) and math.isfinite(float(row["loss"]))
    assert float(row["eval/psnr"]) == pytest.approx(scalars["eval/psnr"][1])
    assert float(row["eval/psnr"]) > 0
    assert row["final_step"] == "2" and float(row["wall_time_s"]) > 0
  md = (root / "summary.md").read_text().splitlines()
  assert md[2].startswith("| point | data.num_train | status") and len(md) == 4 + 3
  # TensorBoard's hparams view: the experiment, and per point its final metrics.
  hp = summary.read_scalars(str(root / "hparams" / names[1]))
  assert hp["loss"][1] == pytest.approx(float(rows[1]["loss"]), rel=1e-6)
  assert os.listdir(root / "hparams" / names[1])[0].startswith("events.out.tfevents.")

  before = _mtimes(root)
  start = time.time()
  proc = _cli([f"--sweep={path}", f"--root={root}"])
  rerun = time.time() - start
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "3 already finished, 0 to run" in proc.stdout
  assert _mtimes(root) == before  # checkpoints, events, logs and records untouched
  rows = list(csv.DictReader(open(root / "summary.csv")))
  assert {r["this_run"] for r in rows} == {"skipped"} and {r["status"] for r in rows} == {"done"}
  print(f"three-point sweep: {first:.1f} s; rerun: {rerun:.1f} s")
  assert rerun < first / 2


@pytest.mark.slow
def test_failed_point_is_reported_and_others_go_on(tmp_path):
  # float16 training passes the config checks but train.py refuses it at start.
  path = _sweep_file(tmp_path, """
      def sweep():
        return [{"model.dtype": "float16"}, {"model.param_dtype": "float16"}]
  """)
  root = tmp_path / "root"
  proc = _cli([f"--sweep={path}", f"--root={root}"])
  assert proc.returncode == 1
  assert "[2/2]" in proc.stdout and "point 1-param_dtype=float16: failed" in proc.stdout
  assert "model.param_dtype='float16' is refused" in proc.stdout
  assert "2 point(s) did not finish" in proc.stderr
  rows = list(csv.DictReader(open(root / "summary.csv")))
  assert [r["status"] for r in rows] == ["failed", "failed"]


# --- summary without training ---------------------------------------------------------------------

_SUMMARY_PROBE = r"""
import json, os, sys
from tensorboard.compat.proto import summary_pb2
from tensorboard.util import tensor_util
from latent_diffusion_jax.cli import sweep as _cli  # the whole command's imports
from latent_diffusion_jax.sweeps import local_run, spec, summary

root, sweep_path = sys.argv[1], sys.argv[2]
sweep = spec.load_sweep(sweep_path)
results = []
for p, loss in zip(sweep.points, [3.0, 2.0, float("nan")]):
  workdir = os.path.join(root, p.dirname)
  # Two logging steps as the trainer writes them (tensor scalars); the summary takes the last.
  events = []
  for step, value in ((1, loss + 1), (2, loss)):
    s = summary_pb2.Summary()
    for tag, v in (("loss", value), ("grad_norm", 9.0), ("eval/psnr", 20.0 + step)):
      s.value.add(tag=tag, metadata=summary.scalar_metadata.create_summary_metadata("", ""),
                  tensor=tensor_util.make_tensor_proto(v))
    events.append((step, s))
  summary._write_events(workdir, events)
  status = local_run.FAILED if p.index == 2 else local_run.DONE
  results.append(local_run.Result(p, workdir, status, 1.5, 2, 0))
paths = summary.write_summary(root, results, sweep.name)
print(json.dumps({"tensorflow": "tensorflow" in sys.modules, "clu": "clu" in sys.modules,
                  "paths": paths}))
"""


def test_summary_from_event_files_loads_no_tensorflow(tmp_path):
  proc = subprocess.run([sys.executable, "-c", _SUMMARY_PROBE, str(tmp_path), EXAMPLE], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["tensorflow"] is False and report["clu"] is False
  rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
  assert list(rows[0]) == ["point", "optimizer.learning_rate", "status", "this_run", "final_step",
                           "loss", "eval/psnr", "wall_time_s", "workdir"]
  assert [float(r["loss"]) for r in rows[:2]] == [3.0, 2.0] and rows[2]["loss"] == "nan"
  assert [r["eval/psnr"] for r in rows] == ["22.0"] * 3
  assert [r["status"] for r in rows] == ["done", "done", "failed"]
  md = (tmp_path / "summary.md").read_text()
  assert "| 1 | 0.002 | done | trained | 2 | 2 | 22 | 1.5 | 1-learning_rate=0.002 |" in md
  # The hparams view: one session per point with its final metrics (a NaN loss is left out).
  assert summary.read_scalars(str(tmp_path / "hparams" / "0-learning_rate=0.0005")) == {
      "loss": (2, 3.0), "eval/psnr": (2, 22.0)}
  assert summary.read_scalars(str(tmp_path / "hparams" / "2-learning_rate=0.008")) == {
      "eval/psnr": (2, 22.0)}
  experiment, sessions = _hparams_records(tmp_path / "hparams")
  assert [h.name for h in experiment.hparam_infos] == ["optimizer.learning_rate"]
  assert [m.name.tag for m in experiment.metric_infos] == ["loss", "eval/psnr"]
  assert sessions["1-learning_rate=0.002"].hparams["optimizer.learning_rate"].number_value == 0.002


def _hparams_records(logdir):
  """The experiment and each run's SessionStartInfo, parsed as TensorBoard's hparams plugin does."""
  from tensorboard.compat.proto import event_pb2
  from tensorboard.plugins.hparams import metadata

  def plugin_data(directory, tag, parse):
    (path,) = [os.path.join(directory, f) for f in os.listdir(directory) if f.startswith("events")]
    for record in summary._records(path):
      for value in event_pb2.Event.FromString(record).summary.value:
        if value.tag == tag:
          assert value.metadata.plugin_data.plugin_name == metadata.PLUGIN_NAME
          return parse(value.metadata.plugin_data.content)

  experiment = plugin_data(logdir, metadata.EXPERIMENT_TAG, metadata.parse_experiment_plugin_data)
  sessions = {d: plugin_data(os.path.join(logdir, d), metadata.SESSION_START_INFO_TAG,
                             metadata.parse_session_start_info_plugin_data)
              for d in os.listdir(logdir) if os.path.isdir(os.path.join(logdir, d))}
  return experiment, sessions


def test_parallel_slots_split_cores_and_gpus(monkeypatch):
  from latent_diffusion_jax.sweeps import local_run
  monkeypatch.setattr(local_run.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7},
                      raising=False)
  assert [local_run._slot_cores(3, s) for s in range(3)] == [[0, 1], [2, 3], [4, 5]]
  assert [local_run._slot_cores(10, s) for s in (0, 9)] == [[0], [1]]
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_foo=1")
  options = local_run.LocalOptions(root="/r", parallel=2, cpu_devices_per_point=2,
                                   gpu_ids=("0", "1", "2", "3"))
  envs = [local_run._slot_env(options, s) for s in range(2)]
  assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1", "2,3"]
  assert envs[1]["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=2"]
  assert envs[0]["OMP_NUM_THREADS"] == "4"
