"""Tiny random ModelBundles for the export tests (test_export.py, test_single_file.py).

"sd1" mirrors SD 1.x (num_heads, conv projections, quick_gelu CLIP read at its last layer, eps);
"sd2" mirrors SD 2.x (head_dim, linear projections, depth-2 transformers, gelu CLIP read at its
penultimate layer, v-prediction) and uses GroupNorm counts the original yaml cannot express.
"""

import os

import jax
import jax.numpy as jnp
import flax.linen as nn

from latent_diffusion_jax.data import shapes
from latent_diffusion_jax.data.tokenizers import build_word_tokenizer, load_tokenizer
from latent_diffusion_jax.models.autoencoder import AutoencoderKL
from latent_diffusion_jax.models.bundle import ModelBundle
from latent_diffusion_jax.models.text_encoders import CLIPTextModel, LDMTextTransformer
from latent_diffusion_jax.models.unet import UNet2DConditionModel

MAX_LENGTH = 12
SD_DIFFUSION = {"schedule": "scaled_linear", "num_timesteps": 1000, "beta_start": 0.00085,
                "beta_end": 0.012, "rescale_zero_terminal_snr": False, "prediction_type": "epsilon"}


def _init(module, *args, seed):
  """Random params shaped by `jax.eval_shape(module.init)`: tracing only, so no compile (a jitted
  init of even a tiny UNet takes tens of seconds on a loaded 2-core machine)."""
  import numpy as np
  from flax import traverse_util
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *args)["params"])
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in traverse_util.flatten_dict(shapes).items():
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if path[-1] == "kernel":
      value = noise / np.sqrt(np.prod(leaf.shape[:-1]))
    elif path[-1] == "scale":
      value = 1.0 + 0.1 * noise
    else:  # biases, embeddings
      value = 0.1 * noise
    out[path] = value.astype(leaf.dtype)
  return traverse_util.unflatten_dict(out)


def tiny_bundle(tmp_dir: str, kind: str = "sd1") -> ModelBundle:
  """A randomly initialized bundle with a word tokenizer written under `tmp_dir`."""
  tok_dir = build_word_tokenizer(shapes.vocabulary(), os.path.join(tmp_dir, "tokenizer"),
                                 model_max_length=MAX_LENGTH)
  tokenizer = load_tokenizer(tok_dir)
  vocab = len(tokenizer.get_vocab())
  if kind == "sd1":
    unet = UNet2DConditionModel(block_out_channels=(32, 64), attention_levels=(True, False),
                                layers_per_block=1, num_heads=4, cross_attention_dim=32)
    vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1)
    text = CLIPTextModel(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=MAX_LENGTH, eos_token_id=tokenizer.eos_token_id)
    diffusion = dict(SD_DIFFUSION)
  elif kind == "sd2":
    unet = UNet2DConditionModel(block_out_channels=(16, 32, 32), attention_levels=(True, True, False),
                                layers_per_block=1, num_heads=None, head_dim=8, transformer_depth=2,
                                cross_attention_dim=24, use_linear_projection=True,
                                upcast_attention=True, norm_num_groups=8, num_class_embeds=3)
    vae = AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
    text = CLIPTextModel(vocab_size=vocab, hidden_size=24, intermediate_size=48,
                         num_hidden_layers=3, num_attention_heads=3,
                         max_position_embeddings=MAX_LENGTH, hidden_act="gelu",
                         output_layer="penultimate")
    diffusion = dict(SD_DIFFUSION, prediction_type="v_prediction", rescale_zero_terminal_snr=True)
  elif kind == "ldm":
    unet = UNet2DConditionModel(block_out_channels=(32, 64), attention_levels=(True, False),
                                layers_per_block=1, num_heads=4, cross_attention_dim=32)
    vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1)
    text = LDMTextTransformer(vocab_size=vocab, max_length=MAX_LENGTH, width=32, depth=2, heads=4)
    diffusion = dict(SD_DIFFUSION, schedule="linear", beta_start=1e-4, beta_end=0.02)
  else:
    raise ValueError(kind)
  f = vae.downsample_factor
  image_size = 16
  latent = jnp.zeros((1, image_size // f, image_size // f, unet.in_channels))
  ids = jnp.zeros((1, MAX_LENGTH), jnp.int32)
  ctx = jnp.zeros((1, MAX_LENGTH, unet.cross_attention_dim))
  labels = (jnp.zeros((1,), jnp.int32),) if unet.num_class_embeds else ()
  return ModelBundle(
      unet=unet, unet_params=_init(unet, latent, jnp.zeros((1,), jnp.int32), ctx, *labels, seed=0),
      vae=vae, vae_params=_init(vae, jnp.zeros((1, image_size, image_size, 3)), seed=1),
      text_encoder=text, text_encoder_params=_init(text, ids, seed=2), tokenizer_path=tok_dir,
      scaling_factor=0.5, diffusion=diffusion, image_size=image_size, max_length=MAX_LENGTH,
      metadata={"step": 1234, "config": {"note": "tiny test model"}})


def assert_trees_equal(a, b):
  """Same paths, shapes, dtypes and bit-identical values."""
  import numpy as np
  from flax import traverse_util
  fa = traverse_util.flatten_dict(nn.meta.unbox(a))
  fb = traverse_util.flatten_dict(nn.meta.unbox(b))
  assert set(fa) == set(fb), (sorted(set(fa) ^ set(fb)))[:10]
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.shape == y.shape and x.dtype == y.dtype, (k, x.shape, y.shape, x.dtype, y.dtype)
    np.testing.assert_array_equal(x, y, err_msg="/".join(k))


_CACHE = {}


def cached_bundle(kind: str, tmp_path_factory) -> ModelBundle:
  """One bundle per kind per test session, shared by the test modules that import this."""
  if kind not in _CACHE:
    _CACHE[kind] = tiny_bundle(str(tmp_path_factory.mktemp(f"bundle_{kind}")), kind)
  return _CACHE[kind]
