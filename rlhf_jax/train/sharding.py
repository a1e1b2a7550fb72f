"""Device mesh, logical-axis rules, and placing host data as global arrays.

One code path from one CPU to a pod (MaxText's pattern): the mesh has named
axes `data`, `fsdp`, `tensor`; parameters carry logical axis names; RULES maps
logical names to mesh axes. Batches are split over `data` and `fsdp`.
"""
from __future__ import annotations

import math
import os

import jax
import numpy as np
import flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Parameters: embed over fsdp (ZeRO-3 style),
# heads/mlp/vocab over tensor (Megatron). Activations: batch over data+fsdp.
RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("scalar", None),
    ("length", None),
    ("layers", None),  # the stacked layer axis of model.scan_layers: every device holds all layers
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
)


def resolve_mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, int, int]:
  """Sizes for (data, fsdp, tensor); one -1 fills the remaining devices."""
  sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh: sizes must be positive or -1, got {dict(zip(AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if n_devices % known:
      raise ValueError(f"config.mesh: {dict(zip(AXES, sizes))} does not divide {n_devices} devices")
    sizes[fill[0]] = n_devices // known
  if math.prod(sizes) != n_devices:
    raise ValueError(f"config.mesh: {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"found {n_devices}")
  return tuple(sizes)


def make_mesh(mesh_cfg) -> Mesh:
  shape = resolve_mesh_shape(mesh_cfg, jax.device_count())
  return mesh_of(shape, jax.devices())


def mesh_of(shape, devices) -> Mesh:
  # Auto axes: GSPMD propagates shardings from params and with_sharding_constraint
  # (newer jax defaults make_mesh to Explicit axes, a different programming model).
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  return jax.make_mesh(tuple(shape), AXES, axis_types=auto, devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def logical_sharding(abstract_boxed, mesh: Mesh, rules=RULES):
  """NamedShardings for a pytree of (possibly) LogicallyPartitioned abstract values."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading axis over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy batch -> global jax arrays sharded over data axes.

  Each process passes the rows its own devices hold (`process_rows`, the
  order `make_array_from_process_local_data` maps them in); it stitches them
  together.
  """
  def put(x):
    x = np.asarray(x)
    sharding = batch_sharding(mesh, x.ndim)
    return jax.make_array_from_process_local_data(sharding, x)
  return jax.tree.map(put, batch)


def process_rows(mesh: Mesh, n: int) -> np.ndarray:
  """Rows of a global batch of n that this process's devices hold under `batch_sharding`,
  ascending: the local data `make_array_from_process_local_data` expects.

  Taken from the sharding's own index map, not assumed to be [p n/P, (p+1) n/P):
  a mesh's device order (jax.make_mesh follows a TPU pod's physical topology) need
  not follow process order. Processes that replicate a shard hold the same rows.
  """
  index = batch_sharding(mesh, 1).addressable_devices_indices_map((n,))
  rows = set()
  for idx in index.values():
    rows.update(range(*idx[0].indices(n)))
  return np.asarray(sorted(rows), np.int64)


def host_slice(arrays: dict, rows, mesh: Mesh) -> dict:
  """This process's share of the global batch made of `rows` (global row indices)."""
  idx = np.asarray(rows)[process_rows(mesh, len(rows))]
  return {k: v[idx] for k, v in arrays.items()}


def global_batches(arrays: dict, batch_size: int, mesh: Mesh):
  """Every row once, in global batches; the last one is filled up by wrapping around.

  Yields (start, n_real, host slice): a caller keeps the first n_real rows of a
  batch's (gathered) outputs, so every row is processed exactly once.
  """
  n = len(next(iter(arrays.values())))
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size) % n
    yield start, min(batch_size, n - start), host_slice(arrays, rows, mesh)


def to_host(x):
  """Fully replicated / addressable global array -> numpy on every host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def maybe_initialize_distributed(dist_cfg) -> None:
  """`jax.distributed.initialize` when the config or the environment asks for it.

  On TPU VM pods and SLURM/Open MPI clusters JAX discovers the coordinator
  itself (`enabled=True`, other fields empty). On plain machines set
  coordinator_address, num_processes and process_id (or the env variables
  RLHF_JAX_COORDINATOR / RLHF_JAX_NUM_PROCESSES / RLHF_JAX_PROCESS_ID).
  """
  env_coord = os.environ.get("RLHF_JAX_COORDINATOR", "")
  if not (dist_cfg.enabled or env_coord):
    return
  kwargs = {}
  coord = dist_cfg.coordinator_address or env_coord
  if coord:
    kwargs = dict(
        coordinator_address=coord,
        num_processes=int(dist_cfg.num_processes or os.environ.get("RLHF_JAX_NUM_PROCESSES", 1)),
        process_id=int(dist_cfg.process_id if dist_cfg.process_id >= 0
                       else os.environ.get("RLHF_JAX_PROCESS_ID", 0)))
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":  # touching the backend first would break init
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
