"""Small layer constructors that attach logical axis names to every parameter.

Every parameter in the package is created through these helpers so that `config.logical_axis_rules`
can map it onto the mesh. Logical axis vocabulary:

  embed     model width (channels / hidden size), the input side of a projection
  mlp       hidden width of feed-forward layers and the output side of channel-growing projections
  heads     fused attention head features (q/k/v output, out-projection input)
  conv_in   input channels of a convolution kernel
  conv_out  output channels of a convolution kernel
  vocab     token-embedding rows
  norm      normalization scales and biases (never sharded)
"""

from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from latent_diffusion_jax.models.group_norm import GroupNorm

Dtype = Any

# A convolution's initializers with their logical axes (kernel HWIO, bias per output channel).
CONV_KERNEL_INIT = nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                (None, None, "conv_in", "conv_out"))
CONV_BIAS_INIT = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",))


def dense(features: int, axes: Tuple[str, str], *, dtype: Dtype, param_dtype: Dtype,
          use_bias: bool = True, name: str | None = None) -> nn.Dense:
  """A Dense layer whose kernel carries `axes` and whose bias carries `axes[1]`; its matmul runs
  on the input flattened to rows (`matmul_last_axis`)."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
      dot_general=dense_dot_general, name=name)


def matmul_last_axis(x: jnp.ndarray, kernel: jnp.ndarray, *, precision=None,
                     preferred_element_type=None) -> jnp.ndarray:
  """`x @ kernel` over x's last axis, computed on x reshaped to [rows, in] and reshaped back.

  The same product, but its gradient with respect to the kernel then contracts one axis instead
  of all of x's leading ones. With several contracted axes XLA:CPU transposed the output gradient
  ([rows, out] -> [out, rows]) and ran the kernel gradient outside its fast matmul library: the
  cpu_small UNet's train step spent 211 of 2,067 ms in those products on one core
  (bench/step_profile.py); flattened, a GEGLU block's gradient took 10.1 instead of 17.9 ms. A
  reshape of leading axes is free on every backend.
  """
  y = lax.dot_general(x.reshape((-1, x.shape[-1])), kernel, (((1,), (0,)), ((), ())),
                      precision=precision, preferred_element_type=preferred_element_type)
  return y.reshape(x.shape[:-1] + kernel.shape[-1:])


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """nn.Dense's `dot_general`: its contraction (lhs's last axis with a 2-D kernel's first, no
  batch axes) as `matmul_last_axis`; any other one as `lax.dot_general`."""
  (lc, rc), (lb, rb) = dimension_numbers
  if tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb and rhs.ndim == 2:
    return matmul_last_axis(lhs, rhs, precision=precision,
                            preferred_element_type=preferred_element_type)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type)


def conv(features: int, kernel_size: Sequence[int] = (3, 3), *, strides: Sequence[int] = (1, 1),
         padding: Any = ((1, 1), (1, 1)), dtype: Dtype, param_dtype: Dtype,
         use_bias: bool = True, name: str | None = None) -> nn.Conv:
  """An NHWC convolution with HWIO kernel axes (None, None, conv_in, conv_out); a 1x1 one runs as
  a matmul over the channels (`conv_general_dilated`)."""
  return nn.Conv(
      features, tuple(kernel_size), strides=tuple(strides), padding=padding, dtype=dtype,
      param_dtype=param_dtype, use_bias=use_bias, kernel_init=CONV_KERNEL_INIT,
      bias_init=CONV_BIAS_INIT, conv_general_dilated=conv_general_dilated, name=name)


def _is_pointwise(rhs_shape, window_strides, padding, lhs_dilation, rhs_dilation,
                  dimension_numbers, feature_group_count, batch_group_count) -> bool:
  """Whether a channels-last convolution is a per-pixel matmul: 1x1 kernel, unit strides and
  dilations, no padding, one group."""
  n = len(rhs_shape)
  channels_last = (isinstance(dimension_numbers, lax.ConvDimensionNumbers)
                   and tuple(dimension_numbers.lhs_spec) == (0, n - 1) + tuple(range(1, n - 1))
                   and tuple(dimension_numbers.rhs_spec) == (n - 1, n - 2) + tuple(range(n - 2))
                   and tuple(dimension_numbers.out_spec) == tuple(dimension_numbers.lhs_spec))
  unit = lambda v: v is None or all(int(d) == 1 for d in v)
  no_pad = padding == "VALID" or (not isinstance(padding, str)
                                  and all(tuple(p) == (0, 0) for p in padding))
  return (channels_last and all(d == 1 for d in rhs_shape[:-2]) and unit(window_strides)
          and unit(lhs_dilation) and unit(rhs_dilation) and no_pad
          and feature_group_count == 1 and batch_group_count == 1)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, with a 1x1 channels-last convolution done as a matmul.

  The same function, but XLA:CPU's convolution library is slow on pointwise kernels over large
  images: the VAE decoder's 64 -> 32 shortcut at 256x256 took 188 ms as a convolution (2-core
  Xeon), a few ms as a matmul. On accelerators XLA lowers both forms to the same matmul.
  """
  if _is_pointwise(rhs.shape, window_strides, padding, lhs_dilation, rhs_dilation,
                   dimension_numbers, feature_group_count, batch_group_count):
    return matmul_last_axis(lhs, rhs.reshape(rhs.shape[-2:]), precision=precision,
                            preferred_element_type=preferred_element_type)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)


def group_norm(num_groups: int = 32, epsilon: float = 1e-6, *, dtype: Dtype, param_dtype: Dtype,
               name: str | None = None) -> GroupNorm:
  """GroupNorm over the channel axis; statistics are computed in float32 whatever `dtype` is."""
  return GroupNorm(
      num_groups=num_groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
      name=name)


def layer_norm(epsilon: float = 1e-5, *, dtype: Dtype, param_dtype: Dtype,
               name: str | None = None) -> nn.LayerNorm:
  """LayerNorm over the last axis."""
  return nn.LayerNorm(
      epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
      name=name)


def embed(num_embeddings: int, features: int, *, dtype: Dtype, param_dtype: Dtype,
          axes: Tuple[str, str] = ("vocab", "embed"), name: str | None = None,
          stddev: float = 0.02) -> nn.Embed:
  """A lookup table with logical axes on its embedding matrix, initialized N(0, stddev^2)."""
  return nn.Embed(
      num_embeddings, features, dtype=dtype, param_dtype=param_dtype,
      embedding_init=nn.with_logical_partitioning(nn.initializers.normal(stddev), axes),
      name=name)


def constrain(x: jnp.ndarray, axes: Tuple[str | None, ...]) -> jnp.ndarray:
  """Logical sharding constraint on an activation; a no-op outside a mesh context."""
  return nn.with_logical_constraint(x, axes)
