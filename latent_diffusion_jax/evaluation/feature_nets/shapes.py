"""A feature network for the embedded shapes data: a small CNN that names color, shape and position.

Inception and CLIP features mean little on 32 px colored shapes, so FID and precision/recall on the
embedded dataset use this network instead: trained (in about a minute on 2 CPU cores) to classify
each image's color, shape and position, its penultimate layer ("features", 128-d) is an embedding
where those attributes are what distances measure, and its concatenated heads ("logits") feed the
Inception Score's recipe.

  python -m latent_diffusion_jax.cli.train_shapes_features --out weights/shapes_features.msgpack
  net = load("weights/shapes_features.msgpack")     # FeatureNet "shapes", dim 128

It trains on its own draws of the generator (seed `TRAIN_SEED`, both splits, so the combinations the
LDM never sees are known to it too), not on the LDM's training images, and reports attribute
accuracy on further unseen draws.
"""

import dataclasses
import os
import time
from typing import Callable, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from latent_diffusion_jax.core.errors import InputFileError, MissingInputError
from latent_diffusion_jax.data import shapes
from latent_diffusion_jax.evaluation.feature_nets.base import FeatureNet

NAME = "shapes"
FEATURE_DIM = 128
IMAGE_SIZE = 32
DEFAULT_WEIGHTS = "weights/shapes_features.msgpack"
TRAIN_COMMAND = "python -m latent_diffusion_jax.cli.train_shapes_features --out {path}"
# Attribute heads, in the order their logits are concatenated.
HEADS = {"color": tuple(shapes.COLORS), "shape": shapes.SHAPES, "position": shapes.POSITIONS}
# Dataset seeds of the network's own data: far from the seeds runs use (0 by default).
TRAIN_SEED, EVAL_SEED = 7919, 7920
_FORMAT = "latent_diffusion_jax.shapes_features.v1"


class ShapesNet(nn.Module):
  """Four 3x3 convolutions (two of stride 2) -> 128-d embedding -> one linear head per attribute.

  Flattening (rather than pooling) the last feature map keeps where in the image things are.
  """
  dim: int = FEATURE_DIM

  @nn.compact
  def __call__(self, images: jax.Array) -> Dict[str, jax.Array]:
    x = images * 2.0 - 1.0
    if x.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
      x = jax.image.resize(x, (x.shape[0], IMAGE_SIZE, IMAGE_SIZE, 3), "bilinear", antialias=True)
    for features, stride in ((16, 1), (32, 2), (32, 2), (64, 2)):
      x = nn.relu(nn.Conv(features, (3, 3), strides=stride)(x))
    x = x.reshape(x.shape[0], -1)
    embedding = nn.relu(nn.Dense(self.dim, name="embedding")(x))
    logits = {name: nn.Dense(len(values), name=f"head_{name}")(embedding)
              for name, values in HEADS.items()}
    return {"features": embedding, **logits}


def _apply(params, images):
  out = ShapesNet().apply({"params": params}, images)
  return {"features": out["features"],
          "logits": jnp.concatenate([out[name] for name in HEADS], axis=-1)}


def feature_net(params) -> FeatureNet:
  return FeatureNet(name=NAME, dim=FEATURE_DIM, apply_fn=_apply, params=params)


def labels(attributes) -> Dict[str, np.ndarray]:
  """Integer class per head for a list of `shapes.sample_attributes` dicts."""
  return {name: np.asarray([values.index(a[name]) for a in attributes], np.int32)
          for name, values in HEADS.items()}


def make_data(count: int, seed: int):
  """(uint8 images [count, 32, 32, 3], labels): half from each split's combinations."""
  half = count // 2
  a = shapes.generate_batch(0, half, split="train", seed=seed, image_size=IMAGE_SIZE)
  b = shapes.generate_batch(0, count - half, split="test", seed=seed, image_size=IMAGE_SIZE)
  return np.concatenate([a[0], b[0]]), labels(a[2] + b[2])


@dataclasses.dataclass
class TrainResult:
  params: dict
  accuracy: Dict[str, float]  # held-out accuracy per head
  seconds: float


def train(*, num_train: int = 8000, num_eval: int = 2000, steps: int = 500,
          batch_size: int = 128, learning_rate: float = 2e-3, seed: int = 0,
          log_fn: Callable[[str], None] = print) -> TrainResult:
  """Trains the network on fresh draws of the shapes generator; accuracy on further draws.

  Training images get a little Gaussian pixel noise, so that generated images (never perfectly
  clean) still land near the clean ones of the same attributes.
  """
  t0 = time.perf_counter()
  images, targets = make_data(num_train, TRAIN_SEED)
  eval_images, eval_targets = make_data(num_eval, EVAL_SEED)
  model = ShapesNet()
  params = model.init(jax.random.key(seed), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)))["params"]
  schedule = optax.cosine_decay_schedule(learning_rate, steps, alpha=0.05)
  tx = optax.adam(schedule)
  opt_state = tx.init(params)

  def loss_fn(p, x, y):
    out = model.apply({"params": p}, x)
    return sum(optax.softmax_cross_entropy_with_integer_labels(out[n], y[n]).mean() for n in HEADS)

  @jax.jit
  def step(p, o, x, y, key):
    x = jnp.clip(x + 0.03 * jax.random.normal(key, x.shape), 0.0, 1.0)
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  for i in range(steps):
    idx = rng.integers(0, num_train, batch_size)
    x = images[idx].astype(np.float32) / 255.0
    y = {n: v[idx] for n, v in targets.items()}
    params, opt_state, loss = step(params, opt_state, x, y, jax.random.fold_in(key, i))
    if (i + 1) % 100 == 0 or i == 0:
      log_fn(f"step {i + 1}/{steps}: loss {float(loss):.4f}")
  accuracy = evaluate_accuracy(params, eval_images, eval_targets)
  return TrainResult(jax.device_get(params), accuracy, time.perf_counter() - t0)


def evaluate_accuracy(params, images: np.ndarray, targets: Dict[str, np.ndarray]) -> Dict[str, float]:
  apply = jax.jit(lambda p, x: ShapesNet().apply({"params": p}, x))
  out = {n: [] for n in HEADS}
  for start in range(0, len(images), 500):
    result = apply(params, images[start:start + 500].astype(np.float32) / 255.0)
    for n in HEADS:
      out[n].append(np.argmax(np.asarray(result[n]), -1))
  return {n: float(np.mean(np.concatenate(out[n]) == targets[n])) for n in HEADS}


def save(path: str, params, accuracy: Optional[Dict[str, float]] = None) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  payload = {"format": _FORMAT, "params": jax.device_get(params),
             "accuracy": dict(accuracy or {})}
  with open(path, "wb") as f:
    f.write(serialization.msgpack_serialize(payload))


def load(path: str = DEFAULT_WEIGHTS) -> FeatureNet:
  """The FeatureNet "shapes" from a file written by the train command.

  Raises:
    MissingInputError: no file at `path`; the message gives the command that writes it.
    InputFileError: a file that is not this network's weights.
  """
  if not path or not os.path.isfile(path):
    raise MissingInputError(f"no shapes feature network weights at {path!r}; train them (about a "
                            f"minute on 2 CPU cores) with: {TRAIN_COMMAND.format(path=path or DEFAULT_WEIGHTS)}")
  with open(path, "rb") as f:
    try:
      payload = serialization.msgpack_restore(f.read())
    except Exception as error:  # msgpack raises several unrelated types on bad bytes
      raise InputFileError(f"{path} is not a shapes feature network file: {error}") from error
  if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
    raise InputFileError(f"{path} is not a shapes feature network file (expected format "
                         f"{_FORMAT!r}); rewrite it with: {TRAIN_COMMAND.format(path=path)}")
  target = ShapesNet().init(jax.random.key(0), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)))["params"]
  try:
    params = serialization.from_state_dict(target, payload["params"])
    jax.tree.map(_check_shape, target, params)
  except (ValueError, KeyError) as error:
    raise InputFileError(f"{path}: the weights do not fit the shapes feature network: {error}") from error
  return feature_net(jax.tree.map(np.asarray, params))


def _check_shape(want, got):
  if np.shape(want) != np.shape(got):
    raise ValueError(f"shape {np.shape(got)}, expected {np.shape(want)}")
