"""The FID Inception-v3 in Flax: pytorch-fid's `fid_inception_v3` with its input handling.

This is the network behind published FID numbers: TensorFlow's 2015-12-05 Inception graph as
pytorch-fid ports it (torchvision's Inception-v3 with four patched block kinds, a 1008-way
classifier, BatchNorm eps 0.001). Differences from torchvision's own Inception-v3, all kept:
  * the 3x3 average pools inside the A, C and E blocks ignore the zero padding
    (`count_include_pad=False`, as TensorFlow pools),
  * the last E block (Mixed_7c) max-pools in its pool branch where the paper average-pools,
  * 1008 classes (TensorFlow's label map), used here only for the Inception Score.
Input handling is pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)`: bilinear
resize to 299x299 exactly as `F.interpolate(mode="bilinear", align_corners=False)` (no
antialiasing, also when shrinking), then [0, 1] -> [-1, 1].

Module and parameter names are torchvision's (`Mixed_5b/branch5x5_2/conv/kernel`), so the
converter maps the PyTorch state dict key by key. BatchNorm statistics live in the usual
"batch_stats" collection; the network is only ever run in inference mode.
"""

from typing import Any, Dict, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

# pytorch-fid resizes every input to this before the network.
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BN_EPSILON = 1e-3

Pair = Union[int, Tuple[int, int]]


def _pair(v: Pair) -> Tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


def resize_like_torch(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """Bilinear resize of [N, H, W, C] to [N, size, size, C] as torch's `F.interpolate` does it.

  torch's bilinear mode with `align_corners=False` samples at half-pixel centers, clamps at the
  borders and, unlike `jax.image.resize`'s default, does not widen the kernel when shrinking; with
  `antialias=False` jax.image computes the same weights (tests/test_inception_fid.py checks this
  for enlarging and shrinking against torch).
  """
  n, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  return jax.image.resize(images, (n, size, size, c), method="bilinear", antialias=False)


class BasicConv(nn.Module):
  """torchvision's BasicConv2d: bias-free conv, BatchNorm (eps 0.001, running stats), ReLU."""
  features: int
  kernel_size: Pair
  strides: Pair = 1
  padding: Pair = 0
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel_size), strides=_pair(self.strides),
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision,
                name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  # TensorFlow's pool: the padded zeros do not count in the mean (pytorch-fid's patch).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int, pad: int = 0) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
  pool_features: int
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: BasicConv(*a, precision=self.precision, **k)  # noqa: E731
    b1 = conv(64, 1, name="branch1x1")(x)
    b5 = conv(48, 1, name="branch5x5_1")(x)
    b5 = conv(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = conv(64, 1, name="branch3x3dbl_1")(x)
    b3 = conv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = conv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: BasicConv(*a, precision=self.precision, **k)  # noqa: E731
    b3 = conv(384, 3, strides=2, name="branch3x3")(x)
    bd = conv(64, 1, name="branch3x3dbl_1")(x)
    bd = conv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = conv(96, 3, strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: BasicConv(*a, precision=self.precision, **k)  # noqa: E731
    c7 = self.channels_7x7
    b1 = conv(192, 1, name="branch1x1")(x)
    b7 = conv(c7, 1, name="branch7x7_1")(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = conv(c7, 1, name="branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = conv(192, 1, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: BasicConv(*a, precision=self.precision, **k)  # noqa: E731
    b3 = conv(192, 1, name="branch3x3_1")(x)
    b3 = conv(320, 3, strides=2, name="branch3x3_2")(b3)
    b7 = conv(192, 1, name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, 3, strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
  """pytorch-fid's FIDInceptionE_1 (`max_pool=False`) and FIDInceptionE_2 (`max_pool=True`)."""
  max_pool: bool = False
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: BasicConv(*a, precision=self.precision, **k)  # noqa: E731
    b1 = conv(320, 1, name="branch1x1")(x)
    b3 = conv(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = conv(448, 1, name="branch3x3dbl_1")(x)
    bd = conv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    pooled = _max_pool_3x3(x, 1, pad=1) if self.max_pool else _avg_pool_3x3(x)
    bp = conv(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
  """Images [N, H, W, 3] in [-1, 1] (299x299 for the published numbers) -> pool3 and logits.

  Attributes:
    num_classes: width of the classifier `fc` (1008 in the FID weights).
    precision: of every conv and of `fc`. HIGHEST by default: published FIDs come from fp32
      features, and TPU/GPU default precisions (bf16 passes, TF32) move FID in the decimals.
  """
  num_classes: int = NUM_CLASSES
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> Dict[str, jax.Array]:
    p = self.precision
    conv = lambda *a, **k: BasicConv(*a, precision=p, **k)  # noqa: E731
    x = conv(32, 3, strides=2, name="Conv2d_1a_3x3")(x)
    x = conv(32, 3, name="Conv2d_2a_3x3")(x)
    x = conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3(x, 2)
    x = conv(80, 1, name="Conv2d_3b_1x1")(x)
    x = conv(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3(x, 2)
    x = InceptionA(32, precision=p, name="Mixed_5b")(x)
    x = InceptionA(64, precision=p, name="Mixed_5c")(x)
    x = InceptionA(64, precision=p, name="Mixed_5d")(x)
    x = InceptionB(precision=p, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, precision=p, name=name)(x)
    x = InceptionD(precision=p, name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, precision=p, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, precision=p, name="Mixed_7c")(x)
    features = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d(1): pool3
    logits = nn.Dense(self.num_classes, precision=p, name="fc")(features)
    return {"features": features, "logits": logits}


def preprocess(images: jax.Array) -> jax.Array:
  """pytorch-fid's input handling: [N, H, W, 3] in [0, 1] -> 299x299 in [-1, 1]."""
  return 2.0 * resize_like_torch(images.astype(jnp.float32)) - 1.0


def apply(variables: Any, images: jax.Array) -> Dict[str, jax.Array]:
  """The FeatureNet apply function: (variables, images [N, H, W, 3] in [0, 1]) -> outputs.

  One module-level function, so every FeatureNet built from it shares one jit cache.
  """
  return InceptionV3FID().apply(variables, preprocess(images))


def abstract_variables(module: Optional[InceptionV3FID] = None) -> Any:
  """{"params", "batch_stats"} as ShapeDtypeStructs, without allocating (the converter's target)."""
  module = module or InceptionV3FID()
  # 75x75 is the smallest input every stride-2 stage accepts; the variables do not depend on it.
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3)))

