"""ControlNet (Zhang et al. 2023) in diffusers' `ControlNetModel` layout.

A trainable copy of a UNet's encoder half (conv_in, time embedding, down levels, mid block; the
same modules and parameter names as models/unet.py) reads the noisy latents plus a control image
embedded by a small convolutional hint encoder ("controlnet_cond_embedding"). A zero-initialized
1x1 convolution on every skip connection ("controlnet_down_blocks_i") and on the mid-block output
("controlnet_mid_block") gives the residuals that the locked UNet adds to its own
(`UNet2DConditionModel(..., down_block_additional_residuals, mid_block_additional_residual)`).

  controlnet, params = controlnet_from_unet(unet, unet_params, jax.random.key(0))
  down, mid = controlnet.apply({"params": params}, x, t, context, control_image, 1.0)
  eps = unet.apply({"params": unet_params}, x, t, context, None, True, down, mid)

Control images are NHWC in [0, 1] (diffusers' control image processor does not normalize them),
at the pixel size whose latents are `sample`: the hint encoder downsamples by
2 ** (len(conditioning_embedding_out_channels) - 1), 8 for Stable Diffusion.
"""

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion_jax.core.errors import UserInputError
from latent_diffusion_jax.models import layers
from latent_diffusion_jax.models.unet import (UNet2DConditionModel, down_levels, embed_time,
                                              level_layout, mid_block)

Dtype = Any
# The UNet fields a ControlNet copies (its encoder half's layout and runtime settings).
SHARED_FIELDS = (
    "in_channels", "block_out_channels", "attention_levels", "layers_per_block", "num_heads",
    "head_dim", "transformer_depth", "cross_attention_dim", "use_linear_projection",
    "upcast_attention", "num_class_embeds", "mid_block_attention", "norm_num_groups", "norm_eps",
    "flip_sin_to_cos", "freq_shift", "dropout", "remat", "attention_impl", "dtype", "param_dtype")
# Fields that must equal the base UNet's for the residuals to fit it (shapes and count of the
# skips, the shared context and class labels); the rest only shape the ControlNet's inside.
COMPOSITION_FIELDS = ("in_channels", "block_out_channels", "layers_per_block",
                      "cross_attention_dim", "num_class_embeds")
# The top-level param trees a ControlNet shares with a UNet (same names, same shapes).
UNET_PARTS = ("conv_in", "time_embedding", "class_embedding", "mid_block")


def _zero_conv(features: int, kernel_size: Sequence[int], *, dtype: Dtype, param_dtype: Dtype,
               name: str) -> nn.Conv:
  """A convolution whose kernel and bias start at zero, with the usual logical axes."""
  return nn.Conv(
      features, tuple(kernel_size), padding=((kernel_size[0] // 2,) * 2,) * 2, dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.zeros_init(), (None, None, "conv_in", "conv_out")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
      name=name)


class ControlNetConditioningEmbedding(nn.Module):
  """The hint encoder: conv_in, then per width step a 3x3 conv and a stride-2 3x3 conv (SiLU after
  each), then a zero-initialized conv_out to the UNet's first width."""
  out_channels: int
  block_out_channels: Sequence[int] = (16, 32, 96, 256)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    chans = tuple(self.block_out_channels)
    x = nn.silu(layers.conv(chans[0], name="conv_in", **kw)(x))
    for i in range(len(chans) - 1):
      x = nn.silu(layers.conv(chans[i], name=f"blocks_{2 * i}", **kw)(x))
      x = nn.silu(layers.conv(chans[i + 1], strides=(2, 2), name=f"blocks_{2 * i + 1}", **kw)(x))
    return _zero_conv(self.out_channels, (3, 3), name="conv_out", **kw)(x)


class ControlNetModel(nn.Module):
  """Residuals for a UNet's skips and mid block from latents, time, context and a control image.

  Attributes: the UNet layout fields of `UNet2DConditionModel` (see SHARED_FIELDS), and
    conditioning_channels: channels of the control image (3: RGB).
    conditioning_embedding_out_channels: the hint encoder's widths; it downsamples the control
      image by 2 ** (len - 1).
    conditioning_channel_order: "rgb", or "bgr" for ControlNets trained on BGR images (the
      channels are flipped first, as diffusers does).
  """
  in_channels: int = 4
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  attention_levels: Sequence[bool] = (True, True, True, False)
  layers_per_block: int = 2
  num_heads: Optional[Any] = 8
  head_dim: Optional[int] = None
  transformer_depth: Any = 1
  cross_attention_dim: int = 768
  use_linear_projection: bool = False
  upcast_attention: bool = False
  num_class_embeds: Optional[int] = None
  mid_block_attention: bool = True
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  dropout: float = 0.0
  remat: bool = False
  attention_impl: str = "auto"
  conditioning_channels: int = 3
  conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256)
  conditioning_channel_order: str = "rgb"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def hint_downsampling(self) -> int:
    """Control-image pixels per latent pixel."""
    return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

  @property
  def num_down_residuals(self) -> int:
    """Residuals for the skips: conv_in, layers_per_block per level, one per downsampler."""
    levels = len(self.block_out_channels)
    return 1 + levels * self.layers_per_block + levels - 1

  def as_unet(self, **overrides) -> UNet2DConditionModel:
    """The UNet whose encoder half this ControlNet copies (its key maps and layout)."""
    fields = {name: getattr(self, name) for name in SHARED_FIELDS}
    fields.update(out_channels=self.in_channels, **overrides)
    # parent=None: a module made inside a method would otherwise become this one's child.
    return UNet2DConditionModel(**fields, parent=None)

  @nn.compact
  def __call__(self, sample: jnp.ndarray, timesteps: jnp.ndarray, context: jnp.ndarray,
               controlnet_cond: jnp.ndarray, conditioning_scale: Any = 1.0,
               class_labels: Optional[jnp.ndarray] = None, guess_mode: bool = False,
               deterministic: bool = True) -> Tuple[Tuple[jnp.ndarray, ...], jnp.ndarray]:
    """Computes the residuals.

    Args:
      sample: noisy latents [B, h, w, in_channels].
      timesteps: [B] or scalar.
      context: [B, L, cross_attention_dim].
      controlnet_cond: control images [B, h * hint_downsampling, w * hint_downsampling,
        conditioning_channels] in [0, 1].
      conditioning_scale: multiplies every residual (a float or a traced scalar).
      class_labels: [B] ints when `num_class_embeds` is set.
      guess_mode: scale the residuals from 0.1 (conv_in's) up to 1 (the mid block's) on a log
        scale, times `conditioning_scale`, as diffusers' guess mode does.
      deterministic: disables dropout.

    Returns:
      (down residuals, one per UNet skip connection; mid residual), each in the UNet's layout.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    chans = tuple(self.block_out_channels)
    expected = (sample.shape[1] * self.hint_downsampling, sample.shape[2] * self.hint_downsampling,
                self.conditioning_channels)
    if tuple(controlnet_cond.shape[1:]) != expected:
      raise UserInputError(
          f"The control image is {tuple(controlnet_cond.shape[1:])} (height, width, channels); "
          f"latents of {sample.shape[1]}x{sample.shape[2]} need {expected} (the hint encoder "
          f"downsamples by {self.hint_downsampling}).")
    if self.conditioning_channel_order not in ("rgb", "bgr"):
      raise UserInputError(f"conditioning_channel_order must be 'rgb' or 'bgr', got "
                           f"{self.conditioning_channel_order!r}.")
    layout = level_layout(self)
    temb = embed_time(self, timesteps, sample.shape[0], class_labels)
    context = context.astype(self.dtype)
    cond = controlnet_cond.astype(self.dtype)
    if self.conditioning_channel_order == "bgr":
      cond = cond[..., ::-1]

    h = layers.conv(chans[0], name="conv_in", **kw)(sample.astype(self.dtype))
    hint = ControlNetConditioningEmbedding(
        chans[0], tuple(self.conditioning_embedding_out_channels),
        name="controlnet_cond_embedding", **kw)
    h = h + hint(cond)
    h, skips = down_levels(self, layout, h, temb, context, deterministic)
    h = mid_block(self, layout, h, temb, context, deterministic)

    down = [_zero_conv(s.shape[-1], (1, 1), name=f"controlnet_down_blocks_{i}", **kw)(s)
            for i, s in enumerate(skips)]
    mid = _zero_conv(h.shape[-1], (1, 1), name="controlnet_mid_block", **kw)(h)
    if guess_mode:
      scales = jnp.logspace(-1.0, 0.0, len(down) + 1, dtype=jnp.float32) * conditioning_scale
    else:
      scales = jnp.full((len(down) + 1,), conditioning_scale, jnp.float32)
    scales = scales.astype(self.dtype)
    down = tuple(d * scales[i] for i, d in enumerate(down))
    return down, mid * scales[-1]


def hint_channels(downsample_factor: int) -> Tuple[int, ...]:
  """Hint encoder widths that downsample control images by `downsample_factor` (the first
  stage's): Stable Diffusion's (16, 32, 96, 256) for 8, its first log2(factor) + 1 otherwise."""
  steps = int(np.log2(downsample_factor))
  if downsample_factor < 1 or 2 ** steps != downsample_factor or steps > 3:
    raise UserInputError(f"No hint encoder widths for downsampling by {downsample_factor}; "
                         "give conditioning_embedding_out_channels (one width per halving, plus "
                         "the first).")
  return (16, 32, 96, 256)[:steps + 1]


def controlnet_like(unet: UNet2DConditionModel, **fields) -> ControlNetModel:
  """A ControlNet with `unet`'s layout and runtime settings; `fields` sets the hint encoder
  (conditioning_channels, conditioning_embedding_out_channels, ...) or overrides."""
  shared = {name: getattr(unet, name) for name in SHARED_FIELDS}
  shared.update(fields)
  return ControlNetModel(**shared)


def example_inputs(controlnet: ControlNetModel, latent_size: Optional[int] = None) -> tuple:
  """Zero inputs of the smallest size the ControlNet takes (for init and eval_shape)."""
  size = latent_size or 2 ** (len(controlnet.block_out_channels) - 1)
  f = controlnet.hint_downsampling
  dtype = controlnet.dtype
  args = (jnp.zeros((1, size, size, controlnet.in_channels), dtype), jnp.zeros((1,), jnp.int32),
          jnp.zeros((1, 1, controlnet.cross_attention_dim), dtype),
          jnp.zeros((1, size * f, size * f, controlnet.conditioning_channels), dtype), 1.0)
  if controlnet.num_class_embeds is not None:
    args += (jnp.zeros((1,), jnp.int32),)
  return args


def abstract_params(controlnet: ControlNetModel) -> Any:
  """The ControlNet's params as boxed `jax.ShapeDtypeStruct`s (logical axis names kept)."""
  return jax.eval_shape(controlnet.init, jax.random.key(0), *example_inputs(controlnet))["params"]


def check_matches_unet(controlnet: ControlNetModel, unet: UNet2DConditionModel,
                       what: str = "The ControlNet") -> None:
  """Raises UserInputError naming every field where `controlnet` cannot drive `unet`."""
  bad = []
  for name in COMPOSITION_FIELDS:
    ours, theirs = getattr(controlnet, name), getattr(unet, name)
    if isinstance(ours, (list, tuple)):
      ours, theirs = tuple(ours), tuple(theirs)
    if ours != theirs:
      bad.append(f"{name} {ours!r} vs the base UNet's {theirs!r}")
  if bad:
    raise UserInputError(f"{what} does not fit the base UNet: " + "; ".join(bad) + ".")


def _copy(x):
  # Real copies: a training step donates the ControlNet's buffers, which must not be the UNet's.
  return jnp.copy(x) if isinstance(x, jax.Array) else np.array(x, copy=True)


def controlnet_from_unet(unet: UNet2DConditionModel, unet_params: Any, rng: jax.Array, *,
                         conditioning_channels: int = 3,
                         conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
                         **fields) -> Tuple[ControlNetModel, Any]:
  """A new ControlNet for `unet`: its encoder half a copy of `unet_params`, zero convs at zero.

  Args:
    unet: the base UNet module.
    unet_params: its params (plain or boxed; numpy or jax arrays).
    rng: initializes the hint encoder (its last conv starts at zero whatever the key).
    conditioning_channels, conditioning_embedding_out_channels: the hint encoder's input channels
      and widths (Stable Diffusion: 3 and (16, 32, 96, 256), which downsample by 8).
    **fields: further ControlNetModel overrides (e.g. remat).

  Returns:
    (module, params): unboxed params shaped like `abstract_params(module)`, whose conv_in,
    time_embedding, class_embedding, down_blocks_* and mid_block are copies of the UNet's.
  """
  controlnet = controlnet_like(
      unet, conditioning_channels=conditioning_channels,
      conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels), **fields)
  reference = nn.meta.unbox(abstract_params(controlnet))
  source = nn.meta.unbox(unet_params)
  hint = ControlNetConditioningEmbedding(
      controlnet.block_out_channels[0], controlnet.conditioning_embedding_out_channels,
      dtype=controlnet.dtype, param_dtype=controlnet.param_dtype)
  f = controlnet.hint_downsampling
  hint_params = nn.meta.unbox(jax.jit(hint.init)(
      rng, jnp.zeros((1, f, f, conditioning_channels), controlnet.dtype))["params"])
  params = {}
  for name, shapes in reference.items():
    if name == "controlnet_cond_embedding":
      params[name] = hint_params
    elif name.startswith("controlnet_"):
      params[name] = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    else:
      if name not in source:
        raise UserInputError(f"The UNet params have no {name!r}; they do not belong to this UNet.")
      params[name] = jax.tree.map(_copy, source[name])
      got = jax.tree.map(np.shape, params[name])
      want = jax.tree.map(lambda s: tuple(s.shape), shapes)
      if got != want:
        raise UserInputError(f"The UNet params' {name!r} do not have this UNet's shapes.")
  return controlnet, params
