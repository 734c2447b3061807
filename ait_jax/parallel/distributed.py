"""Multi-host initialisation and the few cross-process operations the trainer needs.

`initialize` must run before any other JAX call. It reads the coordinator address,
process count and process id from its arguments, else from the environment
(`AIT_COORDINATOR`, `AIT_NUM_PROCESSES`, `AIT_PROCESS_ID`, `AIT_LOCAL_DEVICES`), else
lets `jax.distributed.initialize()` detect the cluster: with `AIT_DISTRIBUTED=auto`
(TPU pods; launch/tpu_pod.sh sets it) or inside a SLURM job of several tasks. A single
process with none of these set runs without the distributed service.
"""

import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

_ENV = {"coordinator": "AIT_COORDINATOR", "num_processes": "AIT_NUM_PROCESSES",
        "process_id": "AIT_PROCESS_ID", "local_devices": "AIT_LOCAL_DEVICES"}
_CLUSTER_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1,
               local_devices: str = "", cpu_collectives: str = "gloo") -> None:
  """Starts the distributed runtime when the run has several processes.

  `local_devices` ("0,1") restricts this process to some local accelerators (one
  process per GPU). On CPU, cross-process collectives use `cpu_collectives`.
  """
  coordinator = coordinator or os.environ.get(_ENV["coordinator"], "")
  num_processes = num_processes or int(os.environ.get(_ENV["num_processes"], "0"))
  if process_id < 0:
    process_id = int(os.environ.get(_ENV["process_id"], "-1"))
  local_devices = local_devices or os.environ.get(_ENV["local_devices"], "")
  ids = [int(i) for i in local_devices.split(",")] if local_devices else None
  if coordinator:
    if num_processes < 1 or process_id < 0:
      raise ValueError(f"coordinator {coordinator!r} is set, so the number of processes "
                       f"and this process's id are needed too (flags --num_processes, "
                       f"--process_id or ${_ENV['num_processes']}, ${_ENV['process_id']})")
    if num_processes == 1:
      return
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               local_device_ids=ids)
  elif os.environ.get("AIT_DISTRIBUTED") == "auto" or (
      any(k in os.environ for k in _CLUSTER_ENV) and _cluster_is_multiprocess()):
    # SLURM: one process per GPU gets GPU SLURM_LOCALID unless `local_devices` says
    # otherwise (one process per node: all its GPUs).
    jax.distributed.initialize(local_device_ids=ids)


def _cluster_is_multiprocess() -> bool:
  """True unless the detected cluster runs a single task (e.g. one SLURM task)."""
  tasks = os.environ.get("SLURM_NTASKS") or os.environ.get("SLURM_NPROCS")
  if tasks is not None:
    return int(tasks) > 1
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES")
  if hosts is not None:
    return len(hosts.split(",")) > 1
  return True


def is_primary() -> bool:
  return jax.process_index() == 0


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is true on any (a collective: all must call)."""
  if jax.process_count() == 1:
    return bool(flag)
  flags = multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))
  return bool(np.max(flags))


def sum_over_processes(values: np.ndarray) -> np.ndarray:
  """Element-wise sum of a float64/int array over processes (all must call)."""
  values = np.asarray(values, np.float64)
  if jax.process_count() == 1:
    return values
  return np.sum(multihost_utils.process_allgather(values), axis=0)


def allgather_bytes(data: bytes, chunk_bytes: int = 1 << 26) -> list[bytes]:
  """Every process's `data`, in process order (a collective: all must call).

  The bytes are zero-padded to the longest and all-gathered in chunks of
  `chunk_bytes`, so no single collective is larger than that per process.
  """
  if len(data) >= 2**31:
    raise ValueError(f"{len(data)} bytes in one process; the gather counts bytes in int32")
  lengths = np.asarray(multihost_utils.process_allgather(
      np.asarray([len(data)], np.int32))).reshape(-1)
  size = int(lengths.max())
  padded = np.zeros((size,), np.uint8)
  padded[:len(data)] = np.frombuffer(data, np.uint8)
  gathered = np.zeros((len(lengths), size), np.uint8)
  for start in range(0, size, chunk_bytes):
    chunk = multihost_utils.process_allgather(padded[start:start + chunk_bytes])
    gathered[:, start:start + chunk_bytes] = np.asarray(chunk).reshape(len(lengths), -1)
  return [bytes(row[:n]) for row, n in zip(gathered, lengths)]


def allgather_json(value) -> list:
  """Every process's JSON-able `value`, in process order (all must call)."""
  if jax.process_count() == 1:
    return [value]
  return [json.loads(data) for data in allgather_bytes(json.dumps(value).encode())]


def barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
