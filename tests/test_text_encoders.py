"""CLIP text encoder and LDM text transformer: parity with transformers, import/export, shapes, sharding."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from latent_diffusion_jax.interop.clip import clip_params_to_torch, load_clip_text_model
from latent_diffusion_jax.interop.convert import WeightImportError
from latent_diffusion_jax.models.text_encoders import CLIPTextModel, LDMTextTransformer

# float32 parity with transformers (observed ~1e-6; both sides accumulate in float32).
FP32_ATOL = 1e-4
# bfloat16 forward vs float32 forward of the same weights, on LayerNorm-scale (|x| <= ~3) outputs
# (observed max 0.026, mean 0.006).
BF16_MAX_ATOL = 0.08
BF16_MEAN_ATOL = 0.015

VOCAB = 1000
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, bos_token_id=0, pad_token_id=1)
# SD 1.x style: OpenAI CLIP, quick_gelu, legacy eos_token_id=2 (pool at the largest id), pad = EOS.
SD1 = dict(TINY, hidden_act="quick_gelu", max_position_embeddings=16, eos_token_id=2)
SD1_EOS = VOCAB - 1
# SD 2.x style: OpenCLIP, gelu, explicit EOS id (pool at its first occurrence), pad = 0.
SD2 = dict(TINY, hidden_act="gelu", max_position_embeddings=77, eos_token_id=500)


def _sd1_ids(rng, batch, length):
  ids = rng.randint(2, SD1_EOS, (batch, length))
  for row, end in enumerate(rng.randint(3, length, batch)):
    ids[row, end:] = SD1_EOS
  return ids


def _sd2_ids(rng, batch, length):
  ids = rng.randint(2, VOCAB, (batch, length))
  ids[ids == SD2["eos_token_id"]] = 3
  for row, end in enumerate(rng.randint(3, length // 2, batch)):
    ids[row, end] = SD2["eos_token_id"]
    ids[row, end + 1:] = 0
    ids[row, -1] = VOCAB - 1  # a larger id after EOS: argmax pooling would pick the wrong token
  return ids


def _save_hf(config, directory):
  import torch
  from transformers import CLIPTextConfig, CLIPTextModel as HFCLIPTextModel
  torch.manual_seed(0)
  model = HFCLIPTextModel(CLIPTextConfig(**config)).eval()
  model.save_pretrained(directory, safe_serialization=True)
  return model


def _hf_forward(model, ids, penultimate=False):
  import torch
  with torch.no_grad():
    out = model(torch.tensor(ids), output_hidden_states=True)
    if not penultimate:
      return out.last_hidden_state.numpy(), out.pooler_output.numpy()
    hidden = model.final_layer_norm(out.hidden_states[-2]).numpy()
  eos = (ids == model.config.eos_token_id).argmax(-1)
  return hidden, hidden[np.arange(len(ids)), eos]


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("sd1_text_encoder"))
  return directory, _save_hf(SD1, directory)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("sd2_text_encoder"))
  return directory, _save_hf(SD2, directory)


def _random_params(module, ids, seed):
  # Filled from numpy: a jitted linen init of even these tiny models takes seconds to compile on CPU.
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), ids))["params"]
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def _boxed_leaves(module, ids):
  variables = jax.eval_shape(module.init, jax.random.key(0), ids)
  return jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))


@pytest.mark.parity
def test_clip_sd1_last_layer_matches_transformers(sd1):
  directory, hf = sd1
  ids = _sd1_ids(np.random.RandomState(0), 3, 16)
  module, params = load_clip_text_model(directory)
  assert module.output_layer == "last" and module.hidden_act == "quick_gelu"
  hidden, pooled = jax.jit(module.apply)({"params": params}, ids)
  want_hidden, want_pooled = _hf_forward(hf, ids)
  assert hidden.shape == (3, 16, 32) and pooled.shape == (3, 32)
  assert hidden.dtype == jnp.float32 and pooled.dtype == jnp.float32
  np.testing.assert_allclose(hidden, want_hidden, rtol=0, atol=FP32_ATOL)
  np.testing.assert_allclose(pooled, want_pooled, rtol=0, atol=FP32_ATOL)


@pytest.mark.parity
def test_clip_sd2_penultimate_layer_matches_transformers(sd2):
  directory, hf = sd2
  ids = _sd2_ids(np.random.RandomState(1), 3, 20)  # shorter than the 77 positions
  module, params = load_clip_text_model(directory, output_layer="penultimate")
  assert module.hidden_act == "gelu" and module.eos_token_id == 500
  hidden, pooled = jax.jit(module.apply)({"params": params}, ids)
  want_hidden, want_pooled = _hf_forward(hf, ids, penultimate=True)
  np.testing.assert_allclose(hidden, want_hidden, rtol=0, atol=FP32_ATOL)
  np.testing.assert_allclose(pooled, want_pooled, rtol=0, atol=FP32_ATOL)
  # "last" on the same weights is transformers' own output, first-occurrence EOS pooling included.
  last = module.clone(output_layer="last")
  hidden, pooled = jax.jit(last.apply)({"params": params}, ids)
  want_hidden, want_pooled = _hf_forward(hf, ids)
  np.testing.assert_allclose(hidden, want_hidden, rtol=0, atol=FP32_ATOL)
  np.testing.assert_allclose(pooled, want_pooled, rtol=0, atol=FP32_ATOL)


def test_clip_bf16_close_to_fp32(sd1):
  directory, hf = sd1
  ids = _sd1_ids(np.random.RandomState(2), 2, 16)
  module16, params16 = load_clip_text_model(directory, dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params16))
  hidden16, pooled16 = jax.jit(module16.apply)({"params": params16}, ids)
  assert hidden16.dtype == jnp.bfloat16 and pooled16.dtype == jnp.bfloat16
  # transformers' float32 output stands in for ours (equal to 1e-6, see the parity tests).
  hidden32, _ = _hf_forward(hf, ids)
  error = np.abs(np.asarray(hidden16, np.float32) - hidden32)
  assert np.isfinite(error).all()
  assert error.max() <= BF16_MAX_ATOL and error.mean() <= BF16_MEAN_ATOL, (error.max(), error.mean())


def test_clip_is_causal_and_rejects_long_inputs():
  module = CLIPTextModel(**{k: v for k, v in SD1.items() if k not in ("bos_token_id", "pad_token_id")})
  ids = _sd1_ids(np.random.RandomState(3), 2, 16)
  params = _random_params(module, ids, seed=0)
  changed = ids.copy()
  changed[:, 12] = 7
  apply = jax.jit(module.apply)
  a, _ = apply({"params": params}, ids)
  b, _ = apply({"params": params}, changed)
  np.testing.assert_array_equal(a[:, :12], b[:, :12])
  assert not np.allclose(a[:, 12:], b[:, 12:])
  with pytest.raises(ValueError, match="exceeds the 16"):
    module.apply({"params": params}, np.zeros((1, 17), np.int32))


@pytest.mark.parity
def test_clip_export_round_trip_is_exact_and_loads_in_transformers(sd1, tmp_path):
  import torch
  from transformers import CLIPTextModel as HFCLIPTextModel
  directory, _ = sd1
  module, params = load_clip_text_model(directory)
  state_dict = clip_params_to_torch(params)
  assert all(k.startswith("text_model.") for k in state_dict)
  # Older transformers versions saved this buffer; import must drop it.
  state_dict["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
  save_file(state_dict, str(tmp_path / "model.safetensors"))
  with open(tmp_path / "config.json", "w") as f:
    json.dump(module.to_hf_config(), f)
  _, again = load_clip_text_model(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, params, again)

  # The prefixed export is what transformers 4.x writes; transformers 5 must read it too.
  reloaded = HFCLIPTextModel.from_pretrained(str(tmp_path)).eval()
  ids = _sd1_ids(np.random.RandomState(4), 2, 16)
  with torch.no_grad():
    want = reloaded(torch.tensor(ids)).last_hidden_state.numpy()
  hidden, _ = jax.jit(module.apply)({"params": params}, ids)
  np.testing.assert_allclose(hidden, want, rtol=0, atol=FP32_ATOL)

  unprefixed = clip_params_to_torch({"params": params}, prefix=False)
  assert set(unprefixed) == {k[len("text_model."):] for k in state_dict if "position_ids" not in k}


def test_clip_import_error_names_the_keys(sd1, tmp_path):
  directory, _ = sd1
  from safetensors.numpy import load_file
  state_dict = load_file(os.path.join(directory, "model.safetensors"))
  del state_dict["encoder.layers.1.mlp.fc2.bias"]
  state_dict["text_projection.weight"] = np.zeros((8, 32), np.float32)
  state_dict["final_layer_norm.weight"] = np.ones((31,), np.float32)
  save_file(state_dict, str(tmp_path / "model.safetensors"))
  with open(os.path.join(directory, "config.json")) as f:
    (tmp_path / "config.json").write_text(f.read())
  with pytest.raises(WeightImportError) as info:
    load_clip_text_model(str(tmp_path))
  message = str(info.value)
  assert "text_model/encoder/layers_1/mlp/fc2/bias" in message
  assert "text_projection.weight" in message
  assert "final_layer_norm.weight" in message and "(31,)" in message


def test_clip_param_counts_without_allocating():
  def count(module):
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))

  sd15 = CLIPTextModel.from_hf_config(dict(
      vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2))
  assert count(sd15) == 123_060_480
  sd2 = CLIPTextModel.from_hf_config(dict(
      vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
      num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", eos_token_id=2))
  assert count(sd2) == 340_387_840
  with pytest.raises(ValueError, match="hidden_act"):
    CLIPTextModel.from_hf_config(dict(hidden_act="relu"))


def test_clip_params_carry_logical_axes():
  module = CLIPTextModel(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=8, output_layer="penultimate")
  ids = jnp.zeros((1, 8), jnp.int32)
  assert all(isinstance(x, nn.Partitioned) for x in _boxed_leaves(module, ids))
  specs = nn.get_partition_spec(jax.eval_shape(module.init, jax.random.key(0), ids))["params"]
  text = specs["text_model"]
  assert text["embeddings"]["token_embedding"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
  # The last layer is skipped by "penultimate" yet keeps its parameters for import/export.
  layer = text["encoder"]["layers_1"]
  assert layer["self_attn"]["q_proj"]["kernel"] == jax.sharding.PartitionSpec("embed", "heads")
  assert layer["mlp"]["fc2"]["kernel"] == jax.sharding.PartitionSpec("mlp", "embed")
  assert text["final_layer_norm"]["scale"] == jax.sharding.PartitionSpec("norm")


@pytest.mark.parity
def test_clip_sharded_forward_matches_transformers(sd1):
  from latent_diffusion_jax.core import parallel
  directory, hf = sd1
  module, params = load_clip_text_model(directory)
  ids = _sd1_ids(np.random.RandomState(6), 4, 16)
  mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  boxed = jax.eval_shape(module.init, jax.random.key(0), ids)["params"]
  sharded = jax.device_put(params, parallel.logical_to_sharding(boxed, mesh))
  assert sharded["text_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"].sharding.spec == (
      jax.sharding.PartitionSpec("fsdp", "tensor"))
  with parallel.mesh_context(mesh):
    hidden, pooled = jax.jit(module.apply)({"params": sharded}, ids)
  want_hidden, want_pooled = _hf_forward(hf, ids)
  np.testing.assert_allclose(hidden, want_hidden, rtol=0, atol=FP32_ATOL)
  np.testing.assert_allclose(pooled, want_pooled, rtol=0, atol=FP32_ATOL)


def test_ldm_text_transformer():
  module = LDMTextTransformer(vocab_size=100, max_length=12, width=32, depth=2, heads=4, head_dim=16)
  ids = np.random.RandomState(5).randint(0, 100, (2, 12))
  assert all(isinstance(x, nn.Partitioned) for x in _boxed_leaves(module, ids))
  specs = nn.get_partition_spec(jax.eval_shape(module.init, jax.random.key(0), ids))["params"]
  assert specs["layers_0"]["attn"]["to_q"]["kernel"] == jax.sharding.PartitionSpec("embed", "heads")
  params = _random_params(module, ids, seed=1)
  variables = {"params": params}
  assert params["layers_0"]["attn"]["to_q"]["kernel"].shape == (32, 64)  # 4 heads x 16
  assert "bias" not in params["layers_0"]["attn"]["to_q"]
  assert params["layers_0"]["ff_in"]["kernel"].shape == (32, 128)

  apply = jax.jit(lambda v, i: module.apply(v, i).context)
  full = jax.jit(module.apply)(variables, ids)
  assert full.pooled is None
  out = full.context
  assert out.shape == (2, 12, 32) and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()
  changed = ids.copy()
  changed[:, -1] = (ids[:, -1] + 1) % 100
  # Bidirectional: the last token reaches the first position's output.
  assert not np.allclose(apply(variables, changed)[:, 0], out[:, 0])

  half = jax.jit(module.clone(dtype=jnp.bfloat16).apply)(variables, ids[:, :5]).context
  assert half.shape == (2, 5, 32) and half.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(half, np.float32)).all()
