"""The conditioner interface (models/conditioners/): class labels, layouts, precomputed embeddings
and a user's own conditioner, through the train step, sampling, sample.py and export."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from latent_diffusion_jax.core.config import base_config, tiny_models
from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.diffusion import schedules
from latent_diffusion_jax.diffusion.spec import DiffusionSpec
from latent_diffusion_jax.models import build
from latent_diffusion_jax.models.bundle import ModelBundle
from latent_diffusion_jax.models.conditioners.layout import parse_layouts
from latent_diffusion_jax.training.diffusion_step import (DiffusionTask, init_train_state,
                                                          make_train_step, null_inputs)
from tiny_bundles import _init

NAMES = ("red circle", "green circle", "red square", "green square")


def _config(kind, **cond):
  c = tiny_models(base_config(), unet_channels=(16, 32))
  c.model.unet.norm_num_groups = 8
  c.model.unet.num_heads = 2
  c.model.unet.cross_attention_dim = 16
  c.model.vae.block_out_channels = (8, 16)
  c.model.vae.norm_num_groups = 4
  c.model.text_encoder.kind = "none"
  c.model.conditioner.kind = kind
  c.model.conditioner.num_classes = 4
  c.model.conditioner.class_names = NAMES
  c.model.conditioner.layout.update(max_boxes=2, num_bins=8, width=16, depth=1, heads=2, head_dim=8)
  c.model.conditioner.precomputed.update(width=16, length=3)
  for k, v in cond.items():
    c.model.conditioner[k] = v
  return c


def _bundle(config, seed=0):
  unet, vae = build.build_unet(config.model), build.build_first_stage(config)
  cond = build.build_conditioner(config.model)
  labels = (jnp.zeros((1,), jnp.int32),) if unet.num_class_embeds else ()
  unet_params = _init(unet, jnp.zeros((1, 4, 4, 4)), jnp.zeros((1,), jnp.int32),
                      jnp.zeros((1, 1, 16)), *labels, seed=seed)
  vae_params = _init(vae, jnp.zeros((1, 8, 8, 3)), seed=seed + 1)
  cond_params = None
  if cond.module is not None:
    cond_params = jax.tree.map(np.asarray, nn_unbox(cond.init(jax.random.key(seed))))
  return ModelBundle(unet=unet, unet_params=unet_params, vae=vae, vae_params=vae_params,
                     text_encoder=None, text_encoder_params=None, tokenizer_path=None,
                     scaling_factor=1.0, diffusion=DiffusionSpec.from_config(config.diffusion),
                     image_size=8, max_length=1, conditioner=cond, conditioner_params=cond_params)


def nn_unbox(tree):
  return nn.meta.unbox(tree)


def test_class_conditioner_contract():
  c = _config("class", use_unet_class_embedding=True)
  cond = build.build_conditioner(c.model)
  assert build.build_unet(c.model).num_class_embeds == 5  # four classes and the null class
  assert build.build_text_encoder(c.model) is None
  np.testing.assert_array_equal(cond.null_inputs(3)["class_labels"], [4, 4, 4])
  got = cond.sampling_inputs(3, class_labels=["green square", 0, "2"])
  np.testing.assert_array_equal(got["class_labels"], [3, 0, 2])
  with pytest.raises(UserInputError, match=r"class_labels must lie in \[0, 4\).*\[7\]"):
    cond.sampling_inputs(1, class_labels=[7])
  with pytest.raises(UserInputError, match="unknown class name|Unknown class name 'blue circle'"):
    cond.sampling_inputs(1, class_labels=["blue circle"])
  with pytest.raises(UserInputError, match="2 class_labels for 3 images"):
    cond.sampling_inputs(3, class_labels=[0, 1])
  params = cond.init(jax.random.key(0))
  out = cond.encode(params, {"class_labels": jnp.array([0, 4])})
  assert out.context.shape == (2, 1, 16)
  np.testing.assert_array_equal(out.class_labels, [0, 4])
  # Rows of the embedding table: distinct classes give distinct contexts.
  assert not np.allclose(out.context[0], out.context[1])
  # The paper's unit-scale class embedding (nn.Embedding), not the 0.02 of token tables.
  table = np.asarray(nn_unbox(params)["embedding"]["embedding"])
  assert 0.7 < table.std() < 1.3


def test_layout_parsing_and_errors():
  c = _config("layout")
  cond = build.build_conditioner(c.model)
  layouts = [{"objects": [{"box": [0.1, 0.2, 0.4, 0.5], "class": "red square"}]},
             [([0.5, 0.5, 1.0, 1.0], 1), ([0, 0, 0.2, 0.2], "green circle")]]
  got = cond.sampling_inputs(2, layouts=layouts)
  np.testing.assert_array_equal(got["layout_classes"], [[2, -1], [1, 1]])
  np.testing.assert_allclose(got["layout_boxes"][0, 0], [0.1, 0.2, 0.4, 0.5])
  np.testing.assert_array_equal(got["layout_boxes"][0, 1], 0)
  params = cond.init(jax.random.key(0))
  out = cond.encode(params, got)
  # One token per box slot; boxes are a set: swapping two boxes swaps their tokens.
  assert out.context.shape == (2, 2, 16) and out.class_labels is None
  swapped = {k: np.asarray(v)[:, ::-1] for k, v in got.items()}
  np.testing.assert_allclose(cond.encode(params, swapped).context[1], out.context[1, ::-1],
                             atol=1e-5)
  null = cond.null_inputs(2)
  assert not np.allclose(cond.encode(params, null).context, out.context)
  bad = {
      r"layout 0, box 0: box \[1.5, 0.0, 0.5, 0.5\] must lie in \[0, 1\]":
          [[([1.5, 0, 0.5, 0.5], 0)]],
      r"layout 0, box 0: box .* has x0 > x1": [[([0.6, 0, 0.5, 0.5], 0)]],
      r"layout 0 has 3 boxes; .* at most 2 \(model.conditioner.layout.max_boxes\)":
          [[([0, 0, .1, .1], 0)] * 3],
      r"layout 0, box 0: unknown class name 'blue'": [[([0, 0, .1, .1], "blue")]],
      r"class 9 is out of range \[0, 4\)": [[([0, 0, .1, .1], 9)]],
      r"an object needs 'box' and 'class'": [{"objects": [{"box": [0, 0, 1, 1]}]}],
  }
  for message, layout in bad.items():
    with pytest.raises(UserInputError, match=message):
      parse_layouts(layout, 2, 4, NAMES)


def test_precomputed_and_unknown_kinds():
  c = _config("precomputed")
  cond = build.build_conditioner(c.model)
  e = np.ones((2, 3, 16), np.float32)
  np.testing.assert_array_equal(cond.encode(None, {"embeddings": e}).context, e)
  with pytest.raises(UserInputError, match=r"embeddings must be \[n, L, 16\].*got shape \(2, 3, 8\)"):
    cond.sampling_inputs(2, conditions={"embeddings": np.ones((2, 3, 8))})
  with pytest.raises(UserInputError, match="trained on 3 .*precomputed.length"):
    cond.sampling_inputs(2, conditions={"embeddings": np.ones((2, 5, 16))})
  c.model.conditioner.precomputed.width = 8
  with pytest.raises(UserInputError, match="precomputed.width=8 must equal the UNet's cross_attention_dim=16"):
    build.build_conditioner(c.model)
  c.model.conditioner.kind = "no_such_kind"
  with pytest.raises(UserInputError, match="Unknown model.conditioner.kind 'no_such_kind'; valid: clip, "
                     "ldm_transformer, class, layout, precomputed, none"):
    build.build_conditioner(c.model)


USER_FILE = '''
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.models.conditioners.base import Conditioner, Conditioning
from latent_diffusion_jax.models.conditioners import registry


class TwoNumbers(nn.Module):
  """A toy external condition: two numbers per image, each a token through its own MLP."""
  width: int

  @nn.compact
  def __call__(self, numbers):
    x = nn.Dense(self.width)(numbers[..., None])
    return Conditioning(nn.Dense(self.width)(nn.gelu(x)))


def null(n):
  return {"numbers": np.zeros((n, 2), np.float32)}


def check(inputs):
  if np.asarray(inputs["numbers"]).shape[1:] != (2,):
    raise UserInputError("numbers must be [n, 2]")


@registry.register("two_numbers")
def build(model_cfg):
  width = model_cfg.unet.cross_attention_dim
  return Conditioner(kind="two_numbers", module=TwoNumbers(width), fields=("numbers",),
                     trainable=True, context_width=width, null_fn=null, check_fn=check)
'''


def test_user_conditioner_trains_from_its_own_file(tmp_path):
  path = tmp_path / "my_conditioner.py"
  path.write_text(USER_FILE)
  c = _config("two_numbers", module=str(path))
  c.diffusion.caption_dropout = 0.5
  cond = build.build_conditioner(c.model)
  assert cond.kind == "two_numbers" and cond.fields == ("numbers",)
  assert set(build.abstract_params(c)) == {"unet", "vae", "conditioner"}
  unet = build.build_unet(c.model)
  task = DiffusionTask(unet=unet, vae=None, conditioner=cond,
                       schedule=schedules.make_schedule("scaled_linear"), prediction_type="epsilon",
                       caption_dropout=0.5, num_buckets=2)
  tx = optax.adam(1e-2)
  params = {"unet": nn_unbox(unet.init(jax.random.key(0), jnp.zeros((1, 4, 4, 4)), jnp.zeros((1,), jnp.int32),
                                       jnp.zeros((1, 1, 16)))["params"]),
            "conditioner": nn_unbox(cond.init(jax.random.key(1)))}
  state = init_train_state(params, tx, 0, ema=False)
  step = jax.jit(make_train_step(task, tx, lambda s: 1e-2, ema_decay=0.0))
  rng = np.random.default_rng(0)
  batch = {"moments": rng.standard_normal((4, 4, 4, 8)).astype(np.float32),
           "numbers": rng.standard_normal((4, 2)).astype(np.float32)}
  frozen = {"vae": None, "null_inputs": null_inputs(cond)}
  for _ in range(2):
    new_state, metrics = step(state, batch, frozen, jnp.float32(1.0))
    assert bool(metrics["finite"])
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new_state.params["conditioner"],
                         state.params["conditioner"])
    assert max(jax.tree.leaves(moved)) > 0  # the user's module trains with the UNet
    state = new_state
  with pytest.raises(UserInputError, match=r"reads batch fields \['numbers'\]; missing \['numbers'\]"):
    step(state, {"moments": batch["moments"]}, frozen, jnp.float32(1.0))


def test_generate_class_and_layout_models(tmp_path):
  from latent_diffusion_jax.sampling import generate
  bundle = _bundle(_config("class"))
  kw = dict(num_steps=2, seed=3, sampler="ddim")
  a = generate(bundle, [""] * 2, class_labels=["red circle", 3], guidance_scale=3.0, **kw)
  b = generate(bundle, [""] * 2, class_labels=[0, "green square"], guidance_scale=3.0, **kw)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (2, 8, 8, 3)
  unguided = generate(bundle, [""] * 2, class_labels=[0, 3], guidance_scale=1.0, output_type="float", **kw)
  guided = generate(bundle, [""] * 2, class_labels=[0, 3], guidance_scale=3.0, output_type="float", **kw)
  assert np.abs(unguided - guided).max() > 1e-4  # the null class is what guidance pushes from
  with pytest.raises(UserInputError, match="class-conditional .* pass class_labels"):
    generate(bundle, [""], **kw)
  with pytest.raises(UserInputError, match="takes class_labels, not layouts"):
    generate(bundle, [""], layouts=[[]], **kw)

  layout_bundle = _bundle(_config("layout"))
  layouts = [{"objects": [{"box": [0, 0, 0.5, 0.5], "class": "red circle"}]},
             {"objects": [{"box": [0.5, 0.5, 1, 1], "class": 2}, {"box": [0, 0, 0.4, 0.4], "class": 1}]}]
  out = generate(layout_bundle, [""] * 2, layouts=layouts, guidance_scale=2.0, **kw)
  assert out.shape == (2, 8, 8, 3)
  with pytest.raises(UserInputError, match="layout-to-image model: pass layouts"):
    generate(layout_bundle, [""], **kw)


def test_native_export_and_sample_cli_with_class_labels_and_layouts(tmp_path):
  from latent_diffusion_jax.interop.native import export_native, load_native
  from latent_diffusion_jax.sampling import generate, run_sampling
  from latent_diffusion_jax.sampling.conditions import read_layouts
  for kind in ("class", "layout"):
    bundle = _bundle(_config(kind))
    out_dir = str(tmp_path / kind)
    export_native(bundle, out_dir)
    loaded = load_native(out_dir)
    assert loaded.conditioner == bundle.conditioner
    cond = ({"class_labels": [1, 2]} if kind == "class" else
            {"layouts": [[([0, 0, 1, 1], 0)], [([0.2, 0.2, 0.6, 0.9], 3)]]})
    np.testing.assert_array_equal(generate(bundle, [""] * 2, num_steps=2, **cond),
                                  generate(loaded, [""] * 2, num_steps=2, **cond))
  layout_file = tmp_path / "layouts.json"
  layout_file.write_text(json.dumps([{"objects": [{"box": [0, 0, 0.5, 0.5], "class": "red square"}]},
                                     [{"box": [0.5, 0, 1, 0.5], "class": 1}]]))
  layouts = read_layouts([str(layout_file), '{"objects": []}'])
  assert len(layouts) == 3
  saved = run_sampling(out_dir=str(tmp_path / "samples"), source=str(tmp_path / "layout"),
                       layouts=layouts, num_steps=2, num_images_per_prompt=2, print_fn=lambda s: None)
  assert len(saved.images) == 6
  settings = json.load(open(saved.settings))
  assert settings["layouts"][0]["objects"][0]["class"] == "red square"
  saved = run_sampling(out_dir=str(tmp_path / "class_samples"), source=str(tmp_path / "class"),
                       class_labels=["green square", "0"], num_steps=2, print_fn=lambda s: None)
  assert json.load(open(saved.settings))["class_labels"] == ["green square", "0"]
  with pytest.raises(UserInputError, match="Pass one kind of condition"):
    run_sampling(out_dir=str(tmp_path / "x"), source=str(tmp_path / "class"), prompts=["a"],
                 class_labels=[0])


def test_class_model_exports_to_diffusers_unet(tmp_path):
  import torch
  from diffusers import UNet2DConditionModel as TorchUNet
  from latent_diffusion_jax.cli.export import export_bundle
  from latent_diffusion_jax.interop.export_diffusers import ExportError, export_diffusers
  with pytest.raises(ExportError, match="class_context=False"):
    export_bundle(_bundle(_config("class")), "diffusers", str(tmp_path / "no"))
  bundle = _bundle(_config("class", class_context=False, use_unet_class_embedding=True))
  with pytest.raises(ExportError, match="export_class_conditional"):
    export_diffusers(bundle, str(tmp_path / "direct"))
  written = export_bundle(bundle, "diffusers", str(tmp_path / "out"))
  assert json.load(open(written["class_labels"]))["null_class"] == 4
  unet = TorchUNet.from_pretrained(written["unet"]).eval()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 4, 4, 4)).astype(np.float32)
  t = np.array([10, 500, 999])
  labels = np.array([0, 3, 4])  # the last one is the null class
  cond = bundle.conditioner.encode(bundle.conditioner_params, {"class_labels": jnp.asarray(labels)})
  ours = bundle.unet.apply({"params": bundle.unet_params}, x, t, cond.context, cond.class_labels)
  with torch.no_grad():
    theirs = unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                  encoder_hidden_states=torch.zeros(3, 1, 16),
                  class_labels=torch.from_numpy(labels)).sample.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-4)
  assert os.path.isfile(os.path.join(written["vae"], "config.json"))
