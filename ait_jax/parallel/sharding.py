"""Logical axis rules and the shardings they give parameters, optimizer state and batches.

One table maps the logical names that parameters carry (`ait_jax.models.axes`) to mesh
axes. Pure data parallel, FSDP and FSDP + tensor parallel differ only in the mesh shape:
an axis of size 1 shards nothing. A dimension that a mesh axis does not divide stays
replicated along it (small tables, tiny demo models).
"""

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ait_jax.models import axes

BATCH_AXES = ("data", "fsdp")

# FSDP shards every weight along its model width; tensor parallelism splits attention
# heads and MLP hidden units (Megatron style), the vocabulary and the Swin RPE MLP.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (axes.BATCH, BATCH_AXES),
    (axes.EMBED, "fsdp"),
    (axes.MLP, "tensor"),
    (axes.HEADS, "tensor"),
    (axes.QKV, "tensor"),
    (axes.VOCAB, "tensor"),
    (axes.CONV_OUT, "fsdp"),
    (axes.RPE_HIDDEN, "tensor"),
    (axes.CODEBOOK, None),
    (axes.LENGTH, None),
    (axes.KV, None),
    (axes.CONV_IN, None),
    (axes.CONV_H, None),
    (axes.CONV_W, None),
    (axes.RPE_COORD, None),
    (axes.TASKS, None),
    (axes.POSITIONS, None),
)


def _fit(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drop the mesh axes of dimensions they do not divide (those stay replicated)."""
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
    out.append(entry if size > 1 and dim % size == 0 else None)
  return PartitionSpec(*out)


def logical_to_sharding(boxed_tree, mesh: Mesh, rules=LOGICAL_RULES):
  """NamedShardings for a tree of `nn.Partitioned`-boxed (abstract) variables.

  Leaves without logical names are replicated. The result has the unboxed tree's
  structure.
  """
  logical = nn.get_partition_spec(boxed_tree)
  mesh_specs = nn.logical_to_mesh(logical, rules)
  unboxed = nn.meta.unbox(boxed_tree)
  return jax.tree.map(lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)),
                      mesh_specs, unboxed,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Examples split over `data` x `fsdp`; every other dimension replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def _path_keys(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def like_params(abstract_tree, abstract_params, params_shardings, mesh: Mesh):
  """Shardings for a tree that holds copies of the parameters (optimizer moments).

  A leaf whose key path ends with a parameter's key path and has that parameter's
  shape gets the parameter's sharding; every other leaf (step counts, scalars) is
  replicated. This fits any optax state without knowing its classes.
  """
  flat_shapes = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  flat_shardings = jax.tree.leaves(params_shardings)
  by_path = {_path_keys(p): (x.shape, s) for (p, x), s in zip(flat_shapes, flat_shardings)}
  lengths = sorted({len(k) for k in by_path}, reverse=True)

  def pick(path, leaf):
    keys = _path_keys(path)
    for n in lengths:
      if len(keys) >= n and keys[-n:] in by_path:
        shape, s = by_path[keys[-n:]]
        if tuple(shape) == tuple(getattr(leaf, "shape", ())):
          return s
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, abstract_tree)


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh):
  """This process's rows of a batch -> global arrays sharded over data x fsdp.

  Each process holds the rows of its own devices, in process order (the mesh orders
  devices by process), so the global batch is the processes' batches concatenated.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def global_to_host_local(tree, mesh: Mesh):
  """The rows of batch-sharded global arrays that this process fed (numpy)."""
  def local(x):
    if jax.process_count() == 1:
      return np.asarray(x)
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    rows, seen = [], set()
    for s in shards:
      start = s.index[0].start or 0
      if start not in seen:
        seen.add(start)
        rows.append(np.asarray(s.data))
    return np.concatenate(rows)
  return jax.tree.map(local, tree)
