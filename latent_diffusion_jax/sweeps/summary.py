"""The sweep's summary table, read back from what each run wrote: `summary.csv`, `summary.md` and
TensorBoard's hparams view (`tensorboard --logdir <root>/hparams`).

Metrics come from the TensorBoard event files the trainer writes in its workdir: the last `loss`
and the last value of every `eval/*` scalar (stage 1: eval/psnr, eval/ssim). Event files are read
and written with tensorboard's protos and record framing only, so tensorflow is never imported.
"""

import csv
import glob
import math
import os
import shutil
import struct
import time
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util

from latent_diffusion_jax.sweeps.local_run import DONE, Result

FINAL_LOSS = "loss"
EVAL_PREFIX = "eval/"
HPARAMS_DIR = "hparams"


def _records(path: str) -> Iterator[bytes]:
  """The records of a TFRecord file; a record cut short by a running writer ends the file."""
  with open(path, "rb") as f:
    while True:
      header = f.read(12)
      if len(header) < 12:
        return
      (length,) = struct.unpack("<Q", header[:8])
      data = f.read(length)
      if len(data) < length or len(f.read(4)) < 4:
        return
      yield data


def _scalar(value: summary_pb2.Summary.Value):
  kind = value.WhichOneof("value")
  if kind == "simple_value":
    return float(value.simple_value)
  if kind == "tensor":
    array = tensor_util.make_ndarray(value.tensor)
    if array.size == 1 and np.issubdtype(array.dtype, np.number):
      return float(array.reshape(()))
  return None


def read_scalars(logdir: str) -> Dict[str, Tuple[int, float]]:
  """{tag: (step, value)} of the newest value of every scalar in `logdir`'s event files (not
  recursing into subdirectories)."""
  latest: Dict[str, Tuple[int, float, float]] = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    for record in _records(path):
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        plugin = value.metadata.plugin_data.plugin_name
        if plugin not in ("", "scalars"):
          continue
        number = _scalar(value)
        if number is None:
          continue
        key = (event.step, event.wall_time)
        if value.tag not in latest or key >= latest[value.tag][:2]:
          latest[value.tag] = (event.step, event.wall_time, number)
  return {tag: (step, v) for tag, (step, _, v) in latest.items()}


def _metric_tags(scalars: Dict[str, Tuple[int, float]]) -> List[str]:
  return [t for t in sorted(scalars) if t == FINAL_LOSS or t.startswith(EVAL_PREFIX)]


def table(results: Sequence[Result]) -> Tuple[List[str], List[dict]]:
  """(columns, rows): per point its overrides, status, final step, final loss, the last eval
  metrics, wall time and workdir."""
  keys: List[str] = []
  for r in results:
    keys.extend(k for k in r.point.overrides if k not in keys)
  scalars = [read_scalars(r.workdir) for r in results]
  metrics = sorted({t for s in scalars for t in _metric_tags(s)}, key=lambda t: (t != FINAL_LOSS, t))
  rows = []
  for r, s in zip(results, scalars):
    row = {"point": r.point.index, **{k: r.point.overrides.get(k, "") for k in keys},
           "status": r.status, "this_run": "skipped" if r.skipped else "trained",
           "final_step": r.final_step}
    row.update({t: s[t][1] if t in s else "" for t in metrics})
    row.update(wall_time_s=round(r.wall_time_s, 1), workdir=os.path.basename(r.workdir))
    rows.append(row)
  return ["point", *keys, "status", "this_run", "final_step", *metrics, "wall_time_s", "workdir"], rows


def _cell(value) -> str:
  if isinstance(value, float):
    return f"{value:.6g}"
  return "" if value is None else str(value)


def write_csv(path: str, columns: Sequence[str], rows: Sequence[dict]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(columns))
    writer.writeheader()
    writer.writerows([{c: ("" if row[c] is None else row[c]) for c in columns} for row in rows])


def write_markdown(path: str, columns: Sequence[str], rows: Sequence[dict], title: str) -> None:
  lines = [f"# Sweep {title}", "", "| " + " | ".join(columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def _hparam_value(value):
  return value if isinstance(value, (bool, int, float, str)) else repr(value)


def _hparams_summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> summary_pb2.Summary:
  summary = summary_pb2.Summary()
  summary.value.add(tag=tag, metadata=hparams_metadata.create_summary_metadata(data),
                    tensor=hparams_metadata.NULL_TENSOR)
  return summary


def _write_events(logdir: str, summaries: Sequence[Tuple[int, summary_pb2.Summary]]) -> None:
  os.makedirs(logdir, exist_ok=True)
  now = time.time()
  path = os.path.join(logdir, f"events.out.tfevents.{int(now)}.sweep")
  with open(path, "wb") as f:
    writer = RecordWriter(f)
    writer.write(event_pb2.Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
    for step, summary in summaries:
      writer.write(event_pb2.Event(wall_time=now, step=step, summary=summary).SerializeToString())


def write_hparams(root: str, columns: Sequence[str], rows: Sequence[dict],
                  results: Sequence[Result]) -> str:
  """TensorBoard's hparams view under `<root>/hparams`: the experiment (override keys as
  hyperparameters, loss and eval metrics as metrics) and one session per point holding its final
  metrics as scalars. Rewritten whole on every call."""
  logdir = os.path.join(root, HPARAMS_DIR)
  shutil.rmtree(logdir, ignore_errors=True)
  keys = [k for r in results for k in r.point.overrides]
  keys = list(dict.fromkeys(keys))
  metrics = [c for c in columns if c == FINAL_LOSS or c.startswith(EVAL_PREFIX)]
  experiment = api_pb2.Experiment(
      time_created_secs=time.time(),
      hparam_infos=[api_pb2.HParamInfo(name=k) for k in keys],
      metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=m)) for m in metrics])
  _write_events(logdir, [(0, _hparams_summary(
      hparams_metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)))])
  for result, row in zip(results, rows):
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for k, v in result.point.overrides.items():
      v = _hparam_value(v)
      if isinstance(v, bool):
        start.hparams[k].bool_value = v
      elif isinstance(v, (int, float)):
        start.hparams[k].number_value = v
      else:
        start.hparams[k].string_value = v
    ok = result.status == DONE
    end = plugin_data_pb2.SessionEndInfo(
        status=api_pb2.STATUS_SUCCESS if ok else api_pb2.STATUS_FAILURE, end_time_secs=time.time())
    step = row["final_step"] or 0
    scalars = summary_pb2.Summary()
    for m in metrics:
      if isinstance(row[m], float) and math.isfinite(row[m]):
        scalars.value.add(tag=m, metadata=scalar_metadata.create_summary_metadata("", ""),
                          tensor=tensor_util.make_tensor_proto(np.float32(row[m])))
    _write_events(os.path.join(logdir, result.point.dirname), [
        (0, _hparams_summary(hparams_metadata.SESSION_START_INFO_TAG,
                             plugin_data_pb2.HParamsPluginData(session_start_info=start))),
        (step, scalars),
        (step, _hparams_summary(hparams_metadata.SESSION_END_INFO_TAG,
                                plugin_data_pb2.HParamsPluginData(session_end_info=end)))])
  return logdir


def write_summary(root: str, results: Sequence[Result], title: str) -> Dict[str, str]:
  """Writes summary.csv, summary.md and the hparams view under `root`; returns their paths."""
  columns, rows = table(results)
  paths = {"csv": os.path.join(root, "summary.csv"), "md": os.path.join(root, "summary.md")}
  write_csv(paths["csv"], columns, rows)
  write_markdown(paths["md"], columns, rows, title)
  paths["hparams"] = write_hparams(root, columns, rows, results)
  return paths
