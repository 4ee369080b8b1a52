"""ControlNet: our residuals equal diffusers' ControlNetModel on random weights, the UNet adds them
where diffusers does, diffusers and original-layout files load and export, a ControlNet made from a
UNet copies it with zero convs at zero, and layout mismatches are named.

Tolerance: max abs error <= 1e-4 in float32 (both sides fp32, matmul precision "highest").
"""

import numpy as np
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from latent_diffusion_jax.core.errors import MissingInputError, UserInputError  # noqa: E402
from latent_diffusion_jax.interop import controlnet as interop  # noqa: E402
from latent_diffusion_jax.interop.convert import flax_to_torch  # noqa: E402
from latent_diffusion_jax.interop.diffusers import load_unet  # noqa: E402
from latent_diffusion_jax.models import controlnet as controlnet_lib  # noqa: E402
from torch_reference import randomize  # noqa: E402

ATOL = 1e-4
# SD 1.x-like: head counts, conv projections. The hint encoder has SD's four widths (the original
# layout's input_hint_block.14 conv_out), downsampling by 8: 4x4 latents, 32x32 control images.
SD1 = dict(in_channels=4, layers_per_block=1, block_out_channels=(32, 64),
           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=24,
           attention_head_dim=4, norm_num_groups=8,
           conditioning_embedding_out_channels=(4, 8, 8, 16))
# SD 2.x-like: per-level heads, linear projections, upcast attention, depth-2 transformers, class
# labels, two ResNets per level, BGR control images; a 2-width hint encoder (downsampling by 2).
SD2 = dict(in_channels=4, layers_per_block=2, block_out_channels=(16, 32, 32),
           down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
           cross_attention_dim=16, attention_head_dim=[1, 2, 2], use_linear_projection=True,
           upcast_attention=True, transformer_layers_per_block=2, norm_num_groups=8,
           num_class_embeds=5, conditioning_embedding_out_channels=(8, 16),
           controlnet_conditioning_channel_order="bgr")
LATENT = {"sd1": 4, "sd2": 8}


@pytest.fixture(scope="module", autouse=True)
def highest_precision():
  torch.set_num_threads(1)  # torch's pool fighting XLA's for 2 cores slows both
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pair(request, tmp_path_factory):
  cfg = SD1 if request.param == "sd1" else SD2
  torch_cn = randomize(diffusers.ControlNetModel(**cfg), seed=0)
  path = str(tmp_path_factory.mktemp(f"controlnet_{request.param}"))
  torch_cn.save_pretrained(path, safe_serialization=True)
  controlnet, params, _ = interop.load_controlnet_dir(path)
  return request.param, torch_cn, controlnet, params


def _inputs(name, controlnet, seed=1):
  rng = np.random.default_rng(seed)
  s, f = LATENT[name], controlnet.hint_downsampling
  x = rng.standard_normal((2, s, s, 4)).astype(np.float32)
  image = rng.uniform(size=(2, s * f, s * f, 3)).astype(np.float32)
  ctx = rng.standard_normal((2, 5, controlnet.cross_attention_dim)).astype(np.float32)
  labels = np.array([1, 4]) if controlnet.num_class_embeds else None
  return x, np.array([10, 999]), ctx, image, labels


def _torch_residuals(torch_cn, x, t, ctx, image, labels, scale, guess_mode):
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
  with torch.no_grad():
    down, mid = torch_cn(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), nchw(image),
                         conditioning_scale=scale, guess_mode=guess_mode, return_dict=False,
                         class_labels=None if labels is None else torch.from_numpy(labels))
  return [d.numpy().transpose(0, 2, 3, 1) for d in down], mid.numpy().transpose(0, 2, 3, 1)


def _ours(controlnet, params, x, t, ctx, image, labels, scale, guess_mode):
  fn = jax.jit(controlnet.apply, static_argnames=("guess_mode",))
  down, mid = fn({"params": params}, x, t, ctx, image, scale, labels, guess_mode=guess_mode)
  return [np.asarray(d) for d in down], np.asarray(mid)


def _max_err(a, b):
  (da, ma), (db, mb) = a, b
  assert len(da) == len(db)
  return max([np.abs(p - q).max() for p, q in zip(da, db)] + [np.abs(ma - mb).max()])


@pytest.mark.parity
@pytest.mark.parametrize("guess_mode", [False, True])
def test_residuals_match_diffusers(pair, guess_mode):
  name, torch_cn, controlnet, params = pair
  args = _inputs(name, controlnet)
  ref = _torch_residuals(torch_cn, *args, 0.7, guess_mode)
  err = _max_err(_ours(controlnet, params, *args, 0.7, guess_mode), ref)
  assert err <= ATOL, f"{name}: max abs error {err}"
  assert np.abs(ref[1]).max() > 0.1  # not two near-zero tensors
  assert len(ref[0]) == controlnet.num_down_residuals


@pytest.mark.parity
def test_export_loads_in_diffusers_with_equal_residuals(pair, tmp_path):
  name, _, controlnet, params = pair
  path = interop.export_controlnet(controlnet, params, str(tmp_path / "exported"))
  loaded = diffusers.ControlNetModel.from_pretrained(path).eval()
  args = _inputs(name, controlnet, seed=2)
  err = _max_err(_ours(controlnet, params, *args, 1.0, False),
                 _torch_residuals(loaded, *args, 1.0, False))
  assert err <= ATOL, f"{name}: max abs error {err}"
  # And back: the directory we wrote reads into the same module and params.
  again, again_params, _ = interop.load_controlnet_dir(path)
  assert again == controlnet
  _assert_trees_equal(again_params, params)


@pytest.mark.parity
def test_unet_adds_residuals_where_diffusers_does(tmp_path):
  cfg = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
             block_out_channels=(32, 64), down_block_types=SD1["down_block_types"],
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
             attention_head_dim=4, norm_num_groups=8)
  torch_unet = randomize(diffusers.UNet2DConditionModel(**cfg), seed=3)
  torch_unet.save_pretrained(tmp_path, safe_serialization=True)
  unet, params, _ = load_unet(str(tmp_path))
  rng = np.random.default_rng(4)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  t, ctx = np.array([10, 999]), rng.standard_normal((2, 5, 24)).astype(np.float32)
  shapes = [(2, 8, 8, 32), (2, 8, 8, 32), (2, 4, 4, 32), (2, 4, 4, 64)]
  down = [rng.standard_normal(s).astype(np.float32) for s in shapes]
  mid = rng.standard_normal((2, 4, 4, 64)).astype(np.float32)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
  with torch.no_grad():
    ref = torch_unet(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx),
                     down_block_additional_residuals=[nchw(d) for d in down],
                     mid_block_additional_residual=nchw(mid)).sample.numpy().transpose(0, 2, 3, 1)
  out = jax.jit(unet.apply)({"params": params}, x, t, ctx, None, True, down, mid)
  assert np.abs(np.asarray(out) - ref).max() <= ATOL
  with pytest.raises(UserInputError, match="Got 3 down-block residuals; this UNet has 4"):
    unet.apply({"params": params}, x, t, ctx, None, True, down[:3], mid)


def _random_params(module, *args):
  """Random params of `module` from numpy, shaped by eval_shape (a jitted init compiles slowly)."""
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *args)["params"])
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def _assert_trees_equal(a, b):
  fa = traverse_util.flatten_dict(nn.meta.unbox(a))
  fb = traverse_util.flatten_dict(nn.meta.unbox(b))
  assert set(fa) == set(fb), sorted(set(fa) ^ set(fb))[:10]
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


def test_single_file_keys_agree_with_diffusers_converter_and_round_trip(pair, tmp_path):
  """Our original-layout names are the ones diffusers' own single-file converter reads, and an
  original file (with or without the "control_model." prefix) imports back bit for bit."""
  from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
  from safetensors.numpy import load_file, save_file
  name, torch_cn, controlnet, params = pair
  path = interop.export_controlnet_single_file(controlnet, params, str(tmp_path / "cn.safetensors"))
  original = load_file(path)
  assert all(k.startswith("control_model.") for k in original)
  if name == "sd1":  # diffusers' converter knows only SD's four-width hint encoder
    converted = convert_controlnet_checkpoint(original, dict(torch_cn.config))
    expected = {k: v.numpy() for k, v in torch_cn.state_dict().items()}
    assert set(converted) == set(expected)
    for k, v in expected.items():
      np.testing.assert_array_equal(np.asarray(converted[k]), v, err_msg=k)
  base = controlnet.as_unet()
  loaded, loaded_params = interop.load_controlnet_single_file(path, base)
  assert loaded == controlnet.clone(conditioning_channel_order="rgb")  # the file does not say
  _assert_trees_equal(loaded_params, params)
  bare = str(tmp_path / "bare.safetensors")
  save_file({k[len("control_model."):]: v for k, v in original.items()}, bare)
  _assert_trees_equal(interop.load_controlnet_single_file(bare, base)[1], params)
  with pytest.raises(MissingInputError, match="give the base model"):
    interop.load_controlnet_single_file(path, None)


def test_controlnet_from_unet_copies_the_encoder_and_starts_at_zero():
  from latent_diffusion_jax.models.unet import UNet2DConditionModel
  unet = UNet2DConditionModel(block_out_channels=(16, 32), attention_levels=(True, False),
                              layers_per_block=1, num_heads=2, cross_attention_dim=8,
                              norm_num_groups=8, num_class_embeds=3)
  args = (jnp.zeros((1, 4, 4, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 3, 8)),
          jnp.zeros((1,), jnp.int32))
  unet_params = _random_params(unet, *args)
  controlnet, params = controlnet_lib.controlnet_from_unet(
      unet, unet_params, jax.random.key(1), conditioning_embedding_out_channels=(8, 16))
  flat_unet = traverse_util.flatten_dict(nn.meta.unbox(unet_params))
  flat = traverse_util.flatten_dict(params)
  copied = [k for k in flat if not k[0].startswith("controlnet_")]
  assert {k[0] for k in copied} == {"conv_in", "time_embedding", "class_embedding", "down_blocks_0",
                                    "down_blocks_1", "mid_block"}
  for k in copied:
    np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(flat_unet[k]))
    assert flat[k] is not flat_unet[k]  # copies: donating one never frees the other
  zero = [k for k in flat if k[0].startswith("controlnet_") and k[0] != "controlnet_cond_embedding"]
  assert len(zero) == 2 * (controlnet.num_down_residuals + 1)
  assert all(not np.asarray(flat[k]).any() for k in zero)
  assert not np.asarray(flat["controlnet_cond_embedding", "conv_out", "kernel"]).any()
  assert np.asarray(flat["controlnet_cond_embedding", "conv_in", "kernel"]).std() > 0
  # Every parameter carries logical axis names, and the tree matches the module's.
  boxed = traverse_util.flatten_dict(controlnet_lib.abstract_params(controlnet),
                                     is_leaf=lambda _, x: isinstance(x, nn.Partitioned))
  assert set(boxed) == set(flat)
  assert all(isinstance(v, nn.Partitioned) for v in boxed.values())
  # Zero convs: the UNet sees exactly its own prediction at first.
  inputs = (jax.random.normal(jax.random.key(2), (2, 4, 4, 4)), jnp.array([3, 500]),
            jax.random.normal(jax.random.key(3), (2, 3, 8)))
  image = jax.random.uniform(jax.random.key(4), (2, 8, 8, 3))
  labels = jnp.array([0, 2])
  down, mid = jax.jit(controlnet.apply)({"params": params}, *inputs, image, 1.0, labels)
  assert [d.shape[1:] for d in down] == [(4, 4, 16)] * 2 + [(2, 2, 16), (2, 2, 32)]
  assert not any(np.asarray(d).any() for d in down) and not np.asarray(mid).any()
  with pytest.raises(UserInputError, match=r"control image is \(4, 4, 3\).*need \(8, 8, 3\)"):
    controlnet.apply({"params": params}, *inputs, image[:, :4, :4], 1.0, labels)


def test_layout_mismatch_names_the_field(pair):
  _, _, controlnet, _ = pair
  base = controlnet.as_unet()
  controlnet_lib.check_matches_unet(controlnet, base)
  wider = base.clone(block_out_channels=tuple(2 * c for c in base.block_out_channels))
  with pytest.raises(UserInputError, match="block_out_channels .* vs the base UNet's"):
    controlnet_lib.check_matches_unet(controlnet, wider)
  with pytest.raises(UserInputError, match="cross_attention_dim .*; layers_per_block|"
                     "layers_per_block .*; cross_attention_dim"):
    controlnet_lib.check_matches_unet(
        controlnet, base.clone(cross_attention_dim=7, layers_per_block=base.layers_per_block + 1))


def test_torch_keys_of_our_tree_are_diffusers_keys(pair):
  _, torch_cn, _, params = pair
  assert set(flax_to_torch(params)) == set(torch_cn.state_dict())


def test_hint_channels_downsample_like_the_first_stage():
  assert controlnet_lib.hint_channels(8) == (16, 32, 96, 256)
  assert controlnet_lib.hint_channels(4) == (16, 32, 96)
  assert controlnet_lib.hint_channels(1) == (16,)
  with pytest.raises(UserInputError, match="downsampling by 3"):
    controlnet_lib.hint_channels(3)
