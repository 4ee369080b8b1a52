"""Launch files of a sweep for clusters: a SLURM array job, a TPU pod script, a Kubernetes JobSet.

Every point runs the same train.py command as a local sweep would (`python train.py
--config=<BASE_CONFIG> --workdir=<workdir root>/<index>-<name> --config.<key>=<value> ...`), from
the repository checkout `repo_dir` on the cluster, plus the distributed settings the trainer reads
(config.distributed, see training/run.start_distributed) when a point spans several hosts:
  slurm   one array task per point; with nodes > 1 an srun of one process per node, coordinator =
          the first node of the allocation, process id = SLURM_PROCID, count = SLURM_NTASKS.
  tpu     one `gcloud compute tpus tpu-vm ssh --worker=all` per point, one after the other;
          coordinator = worker 0's internal IP, process id = the worker number from the metadata
          server, count = nodes (the TPU VM's hosts).
  jobset  one replicated job per point (Indexed completion, one pod per host): coordinator = the
          DNS name of its index-0 pod, process id = JOB_COMPLETION_INDEX.
The SLURM and TPU text comes from Jinja2 templates below; the JobSet is a dict dumped by PyYAML.
"""

import dataclasses
import re
import shlex
from typing import Dict, List, Optional

import jinja2
import yaml

from latent_diffusion_jax.core.errors import FlagError
from latent_diffusion_jax.sweeps.spec import Point, Sweep

TARGETS = ("slurm", "tpu", "jobset")
JOBSET_API = "jobset.x-k8s.io/v1alpha2"
# Worker number of a TPU VM host, read on the host itself.
TPU_WORKER_ID = ("$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/"
                 "computeMetadata/v1/instance/attributes/agent-worker-number)")


@dataclasses.dataclass(frozen=True)
class LaunchOptions:
  """What a launch file needs beyond the sweep; each target checks its required fields."""
  target: str
  # Shared storage (a mounted path or gs://) under which every point gets its workdir.
  workdir_root: str = ""
  nodes: int = 1
  gpus_per_node: int = 0
  coordinator_port: int = 1234
  # The repository checkout on the cluster (holding train.py and the configs).
  repo_dir: str = "."
  python: str = "python"
  job_name: str = ""
  image: str = ""
  tpu_name: str = ""
  zone: str = ""
  project: str = ""
  partition: str = ""
  time_limit: str = ""
  # At most this many points at once (SLURM array throttle); 0: no limit.
  max_parallel: int = 0


_REQUIRED = {"slurm": ("workdir_root",), "tpu": ("workdir_root", "tpu_name", "zone"),
             "jobset": ("workdir_root", "image")}
_FLAG_OF = {"workdir_root": "--workdir (or --root)", "tpu_name": "--tpu_name", "zone": "--zone",
            "image": "--image"}


def check_options(options: LaunchOptions) -> None:
  """Raises FlagError naming the flag a target misses."""
  if options.target not in TARGETS:
    raise FlagError(f"--launch={options.target!r}; choose one of {', '.join(TARGETS)}.")
  for field in _REQUIRED[options.target]:
    if not getattr(options, field):
      raise FlagError(f"--launch={options.target} needs {_FLAG_OF[field]}.")
  if options.nodes < 1:
    raise FlagError(f"--nodes={options.nodes}; it must be at least 1.")


def train_args(sweep: Sweep, point: Point, workdir_root: str) -> List[str]:
  """train.py's arguments for one point on the cluster (without the distributed flags)."""
  return [f"--config={sweep.base_config}",
          f"--workdir={workdir_root.rstrip('/')}/{point.dirname}", *point.flags()]


def distributed_flags(coordinator: str, num_processes: str, process_id: str) -> List[str]:
  return [f"--config.distributed.coordinator_address={coordinator}",
          f"--config.distributed.num_processes={num_processes}",
          f"--config.distributed.process_id={process_id}"]


def job_name(sweep: Sweep, options: LaunchOptions) -> str:
  """A DNS-1035 label (Kubernetes names and pod hostnames): lowercase, digits and '-'."""
  name = (options.job_name or f"sweep-{sweep.name}").lower()
  name = re.sub(r"[^a-z0-9-]+", "-", name).strip("-")
  if not name or not name[0].isalpha():
    name = "s-" + name
  return name[:40].rstrip("-")


_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                          keep_trailing_newline=True, autoescape=False)


def _shell_path(path: str) -> str:
  """`path` quoted for bash, keeping a leading `~/` expandable."""
  return "~/" + shlex.quote(path[2:]) if path.startswith("~/") else shlex.quote(path)


_ENV.filters["path"] = _shell_path

_SLURM = _ENV.from_string("""\
#!/bin/bash
#SBATCH --job-name={{ job_name }}
#SBATCH --array=0-{{ points | length - 1 }}{% if max_parallel %}%{{ max_parallel }}{% endif %}

#SBATCH --nodes={{ nodes }}
#SBATCH --ntasks-per-node=1
{% if gpus_per_node %}
#SBATCH --gpus-per-node={{ gpus_per_node }}
{% endif %}
{% if partition %}
#SBATCH --partition={{ partition }}
{% endif %}
{% if time_limit %}
#SBATCH --time={{ time_limit }}
{% endif %}
#SBATCH --output={{ workdir_root }}/slurm-%A_%a.out
# Sweep {{ sweep_path }} (base config {{ base_config }}): one array task per point, {{ nodes }}
# node(s) each. A task that is requeued or resubmitted resumes from its point's workdir.
set -euo pipefail
cd {{ repo_dir | path }}
case "$SLURM_ARRAY_TASK_ID" in
{% for p in points %}
  {{ p.index }}) ARGS=({{ p.args }}) ;;  # {{ p.dirname }}
{% endfor %}
  *) echo "no sweep point $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;
esac
{% if nodes > 1 %}
# Process 0 runs on the allocation's first node; array tasks sharing a node get their own ports.
export COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):$(({{ coordinator_port }} + SLURM_ARRAY_TASK_ID))"
srun --nodes={{ nodes }} --ntasks={{ nodes }} --ntasks-per-node=1 bash -c \\
  'exec {{ python }} train.py "$@" --config.distributed.coordinator_address="$COORDINATOR" --config.distributed.num_processes="$SLURM_NTASKS" --config.distributed.process_id="$SLURM_PROCID"' \\
  train.py "${ARGS[@]}"
{% else %}
srun --ntasks=1 {{ python }} train.py "${ARGS[@]}"
{% endif %}

""")

_TPU = _ENV.from_string("""\
#!/bin/bash
# Sweep {{ sweep_path }} (base config {{ base_config }}) on TPU VM {{ tpu_name }} ({{ nodes }}
# host(s)): each point runs on all workers at once, the points one after the other. A point that
# fails is reported and the next one starts; rerunning this script resumes unfinished points.
set -uo pipefail
{% if nodes > 1 %}
COORDINATOR="$(gcloud compute tpus tpu-vm describe {{ tpu_name | path }} {{ gcloud_flags }} --format='value(networkEndpoints[0].ipAddress)'):{{ coordinator_port }}"
{% endif %}
FAILED=""
{% for p in points %}

# point {{ p.index }}: {{ p.dirname }}
gcloud compute tpus tpu-vm ssh {{ tpu_name | path }} {{ gcloud_flags }} --worker=all \\
  --command="{{ p.remote }}" || FAILED="$FAILED {{ p.index }}"
{% endfor %}

if [ -n "$FAILED" ]; then echo "failed points:$FAILED" >&2; exit 1; fi
""")


def _double_quoted(text: str) -> str:
  """`text` escaped to stand inside "..." in bash unchanged."""
  return re.sub(r'([\\"$`])', r"\\\1", text)


def slurm_script(sweep: Sweep, options: LaunchOptions) -> str:
  points = [dict(index=p.index, dirname=p.dirname,
                 args=shlex.join(train_args(sweep, p, options.workdir_root))) for p in sweep.points]
  values = {**dataclasses.asdict(options), "job_name": job_name(sweep, options)}
  return _SLURM.render(points=points, sweep_path=sweep.path, base_config=sweep.base_config,
                       **values)


def tpu_script(sweep: Sweep, options: LaunchOptions) -> str:
  gcloud_flags = f"--zone={shlex.quote(options.zone)}"
  if options.project:
    gcloud_flags += f" --project={shlex.quote(options.project)}"
  points = []
  for p in sweep.points:
    remote = (f"cd {_shell_path(options.repo_dir)} && {options.python} train.py "
              + shlex.join(train_args(sweep, p, options.workdir_root)))
    remote = _double_quoted(remote)
    if options.nodes > 1:
      # The coordinator expands here (where gcloud runs), the worker number on each host.
      remote += " " + " ".join(distributed_flags(
          "${COORDINATOR}", str(options.nodes), _double_quoted(TPU_WORKER_ID)))
    points.append(dict(index=p.index, dirname=p.dirname, remote=remote))
  return _TPU.render(points=points, sweep_path=sweep.path, base_config=sweep.base_config,
                     gcloud_flags=gcloud_flags, **dataclasses.asdict(options))


def jobset_manifest(sweep: Sweep, options: LaunchOptions) -> Dict:
  """The JobSet as a dict: one replicated job per point, `nodes` indexed pods each."""
  name = job_name(sweep, options)
  jobs = []
  for p in sweep.points:
    job = f"p{p.index}"
    args = train_args(sweep, p, options.workdir_root)
    if options.nodes > 1:
      # JobSet's pod hostnames: <jobset>-<replicated job>-<job index>-<pod index>.<subdomain>.
      coordinator = f"{name}-{job}-0-0.{name}:{options.coordinator_port}"
      args += distributed_flags(coordinator, str(options.nodes), "$(JOB_COMPLETION_INDEX)")
    container = {
        "name": "train", "image": options.image,
        "command": [options.python, "train.py"], "args": args,
        # Declared so that $(JOB_COMPLETION_INDEX) in args expands (Kubernetes expands only
        # variables of the container's env list).
        "env": [{"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}],
        "ports": [{"containerPort": options.coordinator_port}],
    }
    if options.repo_dir not in ("", "."):
      container["workingDir"] = options.repo_dir
    if options.gpus_per_node:
      container["resources"] = {"limits": {"nvidia.com/gpu": options.gpus_per_node}}
    jobs.append({"name": job, "replicas": 1, "template": {"spec": {
        "parallelism": options.nodes, "completions": options.nodes, "completionMode": "Indexed",
        "backoffLimit": 0,
        "template": {"metadata": {"labels": {"sweep-point": str(p.index)}},
                     "spec": {"restartPolicy": "Never", "containers": [container]}}}}})
  return {"apiVersion": JOBSET_API, "kind": "JobSet",
          "metadata": {"name": name, "annotations": {
              "sweep": sweep.path, "base-config": sweep.base_config}},
          "spec": {"network": {"enableDNSHostnames": True, "subdomain": name},
                   "replicatedJobs": jobs}}


def jobset_yaml(sweep: Sweep, options: LaunchOptions) -> str:
  header = (f"# Sweep {sweep.path} (base config {sweep.base_config}) as a Kubernetes JobSet: one "
            f"replicated job per point, {options.nodes} pod(s) each.\n"
            "# The workdir root must be storage every pod sees (gs://... or a mounted volume).\n")
  return header + yaml.safe_dump(jobset_manifest(sweep, options), sort_keys=False, width=1000)


def launch_file(sweep: Sweep, options: LaunchOptions) -> str:
  """The text of the launch file for `options.target`."""
  check_options(options)
  return {"slurm": slurm_script, "tpu": tpu_script, "jobset": jobset_yaml}[options.target](
      sweep, options)
