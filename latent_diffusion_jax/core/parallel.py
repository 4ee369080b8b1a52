"""Device mesh, logical axis rules, sharded state creation, global batches and multi-host start-up.

The mesh always has the three axes `("data", "fsdp", "tensor")`; an axis the config does not ask
for simply has size 1, so one set of rules works for every topology.

  data    pure data parallelism: parameters replicated, batch split.
  fsdp    data parallelism whose parameters (and optimizer state) are split too (ZeRO-3 style);
          the batch is split over it as well, and XLA all-gathers weights before use.
  tensor  tensor (model) parallelism: the output side of projections is split, so activations
          inside an MLP / attention block stay split and only block outputs need a reduction.

Model code names axes logically (see models/layers.py); `DEFAULT_LOGICAL_AXIS_RULES` maps them.
"""

import contextlib
import itertools
import math
from typing import Any, Callable, Iterator, Sequence, Tuple

from absl import logging
import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
import numpy as np
from latent_diffusion_jax.core.errors import UserInputError

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension is split over both data-parallel flavours.
BATCH_AXES = ("data", "fsdp")

MeshAxes = str | Tuple[str, ...] | None
LogicalRules = Sequence[Tuple[str, MeshAxes]]

# FSDP shards the *input* side of every weight (embed, conv_in) and tensor parallelism the *output*
# side (mlp, heads, conv_out, vocab). A kernel therefore never asks for the same mesh axis twice,
# and an (embed, mlp) kernel is split over fsdp x tensor. Norm parameters are tiny and replicated.
# Activation names start with "act_" where they differ from the parameter meaning: between blocks
# activations are split over the batch only (act_embed replicated over tensor, the Megatron layout);
# inside MLP/attention blocks the hidden features follow the tensor-split weights.
# Rules are claimed in order and a mesh axis is used once per array, so "batch" comes first: an
# activation mistakenly named ("batch", ..., "embed") keeps its batch split and replicates "embed".
DEFAULT_LOGICAL_AXIS_RULES: Tuple[Tuple[str, MeshAxes], ...] = (
    # Activations.
    ("batch", BATCH_AXES),
    ("length", None),
    ("height", None),
    ("width", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    # Parameters.
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("conv_out", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
)


def _normalize_mesh_shape(mesh_shape: Any) -> Tuple[int, ...]:
  """Turns a dict (ConfigDict) or sequence into one size per MESH_AXES entry, missing ones 1."""
  if hasattr(mesh_shape, "items"):
    shape = dict(mesh_shape.items())
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
      raise UserInputError(f"mesh shape {shape} has unknown axes {unknown}; axes are {MESH_AXES}.")
    sizes = tuple(int(shape.get(name, 1)) for name in MESH_AXES)
  else:
    sizes = tuple(int(s) for s in mesh_shape)
    if not 1 <= len(sizes) <= len(MESH_AXES):
      raise UserInputError(f"mesh shape {tuple(mesh_shape)} must give 1 to {len(MESH_AXES)} sizes for "
                       f"axes {MESH_AXES}.")
    sizes = sizes + (1,) * (len(MESH_AXES) - len(sizes))
  if any(s == 0 or s < -1 for s in sizes):
    raise UserInputError(f"mesh shape {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1.")
  if sizes.count(-1) > 1:
    raise UserInputError(f"mesh shape {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1.")
  return sizes


def _alternatives(sizes: Tuple[int, ...], num_devices: int, limit: int = 4) -> list:
  """Valid shapes for `num_devices`, those changing fewest of the requested sizes first."""
  divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
  valid = [s for s in itertools.product(divisors, repeat=len(sizes)) if math.prod(s) == num_devices]
  valid.sort(key=lambda s: (sum(a != b for a, b in zip(s, sizes)), s))
  return [dict(zip(MESH_AXES, s)) for s in valid[:limit]]


def _resolve_sizes(sizes: Tuple[int, ...], num_devices: int) -> Tuple[int, ...]:
  known = math.prod(s for s in sizes if s != -1)
  requested = dict(zip(MESH_AXES, sizes))
  if -1 in sizes and num_devices % known == 0:
    return tuple(num_devices // known if s == -1 else s for s in sizes)
  if -1 not in sizes and known == num_devices:
    return sizes
  relation = "does not divide" if -1 in sizes else "does not equal"
  raise UserInputError(
      f"mesh shape {requested}: the product of the fixed sizes ({known}) {relation} the device "
      f"count {num_devices}. Valid alternatives include {_alternatives(sizes, num_devices)} "
      f"(or put -1 on one axis to fill it).")


def create_mesh(mesh_shape: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a topology-aware `Mesh` over axes ("data", "fsdp", "tensor").

  Args:
    mesh_shape: a mapping such as `{"data": -1, "fsdp": 4}` (absent axes are 1) or a sequence of up
      to three sizes in ("data", "fsdp", "tensor") order. One size may be -1 to take the remaining
      devices.
    devices: devices to lay out; defaults to `jax.devices()`, i.e. every device of every process.

  Returns:
    A mesh whose axes use automatic (GSPMD) sharding propagation, which the logical constraints of
    Flax linen rely on.

  Raises:
    ValueError: when the sizes cannot cover the device count exactly; the message names the shape,
      the device count and valid alternatives.
  """
  num_devices = len(devices) if devices is not None else jax.device_count()
  sizes = _resolve_sizes(_normalize_mesh_shape(mesh_shape), num_devices)
  # make_mesh orders devices along the physical interconnect (ICI torus / NVLink islands).
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def _fit_to_shape(axes: MeshAxes, size: int, mesh: Mesh) -> MeshAxes:
  """Keeps the longest prefix of `axes` whose mesh extent divides `size`; None replicates."""
  names = (axes,) if isinstance(axes, str) else tuple(axes or ())
  # Axes absent from a hand-made mesh behave like size-1 axes.
  names = tuple(n for n in names if n in mesh.shape)
  while names and size % math.prod(mesh.shape[n] for n in names):
    names = names[:-1]
  if not names:
    return None
  return names[0] if len(names) == 1 else names


def _leaf_spec(leaf: Any, mesh: Mesh, rules: LogicalRules) -> PartitionSpec:
  if not isinstance(leaf, nn.Partitioned):
    return PartitionSpec()
  if isinstance(leaf, nn.LogicallyPartitioned):
    mesh_axes = nn.logical_to_mesh_axes(leaf.names, leaf.rules or rules)
  else:  # plain nn.with_partitioning already names mesh axes
    mesh_axes = leaf.names
  shape = np.shape(leaf.value)
  return PartitionSpec(*(_fit_to_shape(a, d, mesh) for a, d in zip(mesh_axes, shape)))


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def logical_to_sharding(tree: Any, mesh: Mesh,
                        rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES) -> Any:
  """Maps a (boxed) abstract state to `NamedSharding`s.

  A dimension whose size is not divisible by the mesh axes it maps to falls back to fewer axes or
  to replication (an RGB conv kernel's 3 input channels on fsdp=4), so small or odd-sized layers
  never stop a model from being sharded. Leaves without logical names (optimizer step counts,
  RNG keys) are replicated.

  Args:
    tree: typically `jax.eval_shape(init_fn, ...)`, holding `nn.Partitioned` boxes.
    mesh: the device mesh.
    rules: (logical axis, mesh axes) pairs in priority order.

  Returns:
    A tree shaped like the *unboxed* input tree with a `NamedSharding` per array.
  """
  return jax.tree.map(lambda leaf: NamedSharding(mesh, _leaf_spec(leaf, mesh, rules)), tree,
                      is_leaf=_is_box)


def unbox(tree: Any) -> Any:
  """Strips `nn.Partitioned` boxes without adding sharding constraints."""
  return jax.tree.map(lambda x: x.value if _is_box(x) else x, tree, is_leaf=_is_box)


def sharded_abstract_state(init_fn: Callable[..., Any], *args: Any, mesh: Mesh,
                           rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES) -> Tuple[Any, Any]:
  """Shapes, dtypes and shardings of `init_fn(*args)` without running it.

  This is the restore target for a checkpoint: nothing is allocated.

  Args:
    init_fn: as for `create_sharded_state`.
    *args: its arguments (arrays or ShapeDtypeStructs).
    mesh: the device mesh.
    rules: logical axis rules.

  Returns:
    (abstract_state, shardings): an unboxed tree of `jax.ShapeDtypeStruct` carrying `.sharding`,
    and the matching tree of `NamedSharding`.
  """
  boxed = jax.eval_shape(init_fn, *args)
  shardings = logical_to_sharding(boxed, mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          unbox(boxed), shardings)
  return abstract, shardings


def create_sharded_state(init_fn: Callable[..., Any], *args: Any, mesh: Mesh,
                         rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES) -> Tuple[Any, Any]:
  """Runs `init_fn(*args)` so that every array is born sharded on `mesh`.

  `init_fn` may return any pytree (a flax struct TrainState, optax states, dicts) containing
  `nn.Partitioned` boxes, e.g. `TrainState.create(params=model.init(...), tx=tx)`: optax copies
  the boxes onto its moments, so optimizer state is sharded like the parameters. Activation
  constraints inside `init_fn` are no-ops unless this is called inside `mesh_context`.

  Args:
    init_fn: a pure function of `args` (close over modules and configs).
    *args: its array arguments, e.g. an RNG key and dummy inputs.
    mesh: the device mesh.
    rules: logical axis rules.

  Returns:
    (state, shardings): the state with boxes removed (plain jax.Arrays) and the matching tree of
    `NamedSharding`, ready for `jax.jit(..., in_shardings=..., out_shardings=...)`.
  """
  _, shardings = sharded_abstract_state(init_fn, *args, mesh=mesh, rules=rules)
  flat_shardings = jax.tree.leaves(shardings)
  treedefs = []

  # Static pytree metadata may differ between two calls of init_fn (a TrainState holding an optax
  # transformation built inside init_fn), so shardings are matched to outputs by leaf order and the
  # tree is rebuilt from the structure this very call produced.
  def flat_init(*a):
    leaves, treedef = jax.tree.flatten(unbox(init_fn(*a)))
    treedefs.append(treedef)
    return leaves

  leaves = jax.jit(flat_init, out_shardings=flat_shardings)(*args)
  return treedefs[-1].unflatten(leaves), treedefs[-1].unflatten(flat_shardings)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Splits dimension 0 of an `ndim`-dimensional batch array over ("data", "fsdp")."""
  if ndim < 1:
    raise UserInputError(f"a batch array needs a leading batch dimension; got ndim={ndim}.")
  axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
  return NamedSharding(mesh, PartitionSpec(axes or None, *(None,) * (ndim - 1)))


def _batch_shard_counts(mesh: Mesh) -> Tuple[int, int]:
  """(batch shards in the mesh, distinct batch shards held by this process's devices)."""
  axes = [i for i, name in enumerate(mesh.axis_names) if name in BATCH_AXES]
  total = math.prod(mesh.devices.shape[i] for i in axes)
  me = jax.process_index()
  local = {tuple(idx[i] for i in axes) for idx, d in np.ndenumerate(mesh.devices)
           if d.process_index == me}
  return total, len(local)


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Assembles per-process host arrays into global `jax.Array`s split over ("data", "fsdp").

  Each process passes the rows its own devices hold (its slice of the global batch, as the
  per-host input pipeline produces it).

  Args:
    local_batch: a pytree of numpy arrays with the per-process batch as dimension 0.
    mesh: the device mesh.

  Returns:
    The same pytree of global arrays.

  Raises:
    ValueError: when the global batch does not split evenly over data*fsdp.
  """
  total, local = _batch_shard_counts(mesh)
  num_proc = jax.process_count()
  sizes = "*".join(str(mesh.shape.get(a, 1)) for a in BATCH_AXES)

  def one(x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise UserInputError("batch arrays need a leading batch dimension; got a scalar.")
    rows = x.shape[0]
    if rows % local:
      raise UserInputError(
          f"global batch size {rows * num_proc} (per-process {rows} x {num_proc} processes; array "
          f"shape {x.shape}) is not divisible by data*fsdp = {sizes} = {total}; this process "
          f"holds {local} batch shards.")
    global_shape = (rows * total // local,) + x.shape[1:]
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x, global_shape)

  return jax.tree.map(one, local_batch)


def _start_distributed(coordinator_address, num_processes, process_id) -> None:
  if (coordinator_address, num_processes, process_id) != (None, None, None):
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return
  try:
    jax.distributed.initialize()
  except ValueError as e:  # nothing detected, so no coordinator could be named
    logging.info("No multi-process cluster detected (%s); running as one process.", e)
  except RuntimeError as e:  # JAX already started; whatever it set up stands
    logging.warning("JAX backends already initialized, distributed init skipped (in a "
                    "multi-process job call this before any other JAX call): %s", e)


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Starts the multi-process runtime; a no-op for a lone process.

  With no arguments JAX's cluster auto-detection (TPU pods, SLURM, Open MPI, Kubernetes) is tried;
  finding no cluster means a single process. Call this before any other JAX call.

  Args:
    coordinator_address: "host:port" of process 0, or None to auto-detect.
    num_processes: total process count, or None to auto-detect.
    process_id: this process's index, or None to auto-detect.
  """
  single = num_processes == 1 and coordinator_address is None
  if not jax.distributed.is_initialized() and not single:
    _start_distributed(coordinator_address, num_processes, process_id)
  logging.info("process %d of %d; %d local devices, %d global devices (%s)",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.default_backend())


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES) -> Iterator[Mesh]:
  """Makes `nn.with_logical_constraint` (layers.constrain) act on `mesh` under `rules`.

  Trace jitted steps inside this context. Activation constraints have no divisibility fallback:
  batch sizes traced here must be divisible by data*fsdp.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield mesh
