"""bench/scaling.py on a one-level UNet over the tests' 8 fake CPU devices: the throughput sweeps
(batch, data and data x fsdp meshes) time real steps, the memory part compiles ahead of time for
abstract inputs, and remat changes what XLA assigns."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import scaling  # noqa: E402
import side_by_side as sbs  # noqa: E402

from latent_diffusion_jax.core.config import tiny_models  # noqa: E402


pytestmark = pytest.mark.slow  # compiles three train steps and two ahead of time


def _config():
  c = sbs.load_named_config("tiny")
  tiny_models(c, unet_channels=(8,))
  c.model.unet.num_heads = 2
  return c


def test_parse_mesh():
  assert scaling.parse_mesh("4") == (4, 1, 1) and scaling.parse_mesh("2x4") == (2, 4, 1)


def test_throughput_over_meshes_and_memory_with_remat(capsys):
  config = _config()
  rows = [dict(scaling.throughput(config, mesh, 8, steps=1), sweep="devices")
          for mesh in [(1, 1, 1), (2, 4, 1)]]
  for r in rows:
    assert r["images_per_second"] > 0 and r["seconds_per_step"] > 0
  assert [r["devices"] for r in rows] == [1, 8]
  memory = []
  for remat in (False, True):
    config.model.unet.remat = remat
    memory.append(scaling.memory(config, (1, 8, 1), 16))
  for m in memory:
    assert m["argument_bytes"] > 0 and m["temp_bytes"] > 0 and m["unet_params"] > 0
    assert m["total_bytes"] == (m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"]
                                + m["temp_bytes"])
  assert [m["remat"] for m in memory] == [False, True]
  # fsdp shards the state: the donated state is aliased, the arguments are the same either way.
  assert memory[0]["argument_bytes"] == memory[1]["argument_bytes"]
  env = {"date": "d", "machine": "m", "jax": "j", "jax_devices": "8 x cpu",
         "load_before": "l", "load_after": "l"}
  scaling._print({"benchmark": "scaling_memory", "config": "t", "dtype": "bfloat16",
                  "attention": "xla", "rows": memory, **env}, 80.0)
  scaling._print({"benchmark": "scaling_throughput", "config": "t", "dtype": "float32",
                  "attention": "xla", "rows": rows, **env}, 80.0)
  out = capsys.readouterr().out
  assert "| 16 | data 1 x fsdp 8 | off |" in out and "| 16 | data 1 x fsdp 8 | on |" in out
  assert "| devices | data 2 x fsdp 4 | 8 | 8 |" in out
