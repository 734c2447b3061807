"""The device mesh: axes `data`, `fsdp`, `tensor`."""

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replace at most one -1 in `shape` so that the product is `num_devices`."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {shape} must give one size per axis {MESH_AXES}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh shape {shape}: sizes must be positive, with at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh shape {shape} (data x fsdp x tensor) does not divide "
                       f"the {num_devices} devices")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh shape {shape} (data x fsdp x tensor) needs "
                     f"{math.prod(shape)} devices, but {num_devices} are available; "
                     "set one of config.mesh.{data,fsdp,tensor} to -1 to infer it")
  return shape


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over all devices (or `devices`) with Auto axis types.

  Auto axes let XLA propagate shardings through the model from the shardings of
  the parameters and the batch. Devices are ordered by process, so each process's
  devices hold a contiguous block of the batch (what `host_batch_to_global` needs).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(shape, len(devices))
  if len(devices) == jax.device_count() and jax.process_count() == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape),
                         devices=devices)
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(shape))


def mesh_from_config(mesh_cfg) -> Mesh:
  """The mesh of a config's `mesh` section (`data`, `fsdp`, `tensor`; -1 inferred)."""
  return make_mesh((mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor))
