"""Deterministic, resumable, multi-host batch loaders on grain.

Pipeline of one task (one process of `process_count`):

  index range of this process's share -> seeded shuffle -> repeat (training)
  -> read + transform each record (`_ProcessRecord`, a grain MapWithIndex)
  -> batch (MapDataset, so batch k is always records kB..kB+B-1)
  -> worker processes (`mp_prefetch`, each computes whole batches)
  -> `Loader` (main process: counts and logs skipped items).

Everything a batch contains is a function of (seed, process index, position):
the same seed gives the same batches with any number of workers, and the state
(`Loader.get_state()`, a JSON-able dict) restores to exactly the next batch,
with any number of workers.

Sharding splits the index space into `process_count` contiguous equal shares
(the remainder is dropped in training, padded with `valid=False` records in
evaluation) and each process reads only its own; its batch is
`global_batch_size / process_count`, so the global batch is the sum.

Bad data raises `DataError` naming the file. With `skip_bad_records`, a bad
record is replaced by the next good one in the index space (in evaluation the
replacement is marked `valid=False`), so batch shapes and the positions of all
other records never change; every skip is logged and counted
(`Loader.num_skipped`, `Loader.skipped`).
"""

import collections
import dataclasses
import logging
import math
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from input_pipeline.errors import DataError
from input_pipeline.transforms_common import Compose

Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
  """How to batch, shard, shuffle and parallelise one task's data.

  Attributes:
    global_batch_size: batch summed over all processes.
    seed: shuffle and augmentation seed.
    num_epochs: training only; None repeats forever (step-based training).
    worker_count: loader processes (0: all work in this process).
    worker_buffer_size: batches each worker prepares ahead.
    read_threads: threads computing batches in each worker (or this process).
    read_buffer_size: batches those threads prepare ahead.
    process_index, process_count: this host's share; None asks JAX.
    skip_bad_records: replace bad records instead of raising.
    max_consecutive_bad: more bad records in a row than this is an error.
  """
  global_batch_size: int
  seed: int = 0
  num_epochs: int | None = None
  worker_count: int = 0
  worker_buffer_size: int = 2
  read_threads: int = 1
  read_buffer_size: int = 2
  process_index: int | None = None
  process_count: int | None = None
  skip_bad_records: bool = False
  max_consecutive_bad: int = 16


def _process_shard(options: LoaderOptions) -> tuple[int, int]:
  if options.process_index is not None and options.process_count is not None:
    index, count = options.process_index, options.process_count
  else:
    import jax  # pylint: disable=g-import-not-at-top
    index, count = jax.process_index(), jax.process_count()
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} not in [0, {count})")
  return index, count


def _derived_seed(*values: int) -> int:
  return int(np.random.SeedSequence(list(values)).generate_state(1)[0])


def _check_finite(record: dict) -> None:
  for key, value in record.items():
    if (isinstance(value, np.ndarray) and value.dtype.kind == "f"
        and not np.isfinite(value).all()):
      raise DataError(f"{record.get('_origin', 'record')}: non-finite values "
                      f"in '{key}'")


class _ProcessRecord(grain.transforms.MapWithIndex):
  """Reads source[index] and transforms it with a generator seeded by position."""

  def __init__(self, source, transform: Compose, *, seed: int,
               process_index: int, skip_bad: bool, max_bad: int,
               mark_valid: bool):
    self.source = source
    self.transform = transform
    self.seed = seed
    self.process_index = process_index
    self.skip_bad = skip_bad
    self.max_bad = max_bad
    self.mark_valid = mark_valid

  def map_with_index(self, position: int, index: int) -> dict:
    n = len(self.source)
    skipped = []
    for attempt in range(self.max_bad + 1):
      try:
        record = dict(self.source[(index + attempt) % n])
        record["_position"] = position
        rng = np.random.default_rng(
            [self.seed, self.process_index, position, attempt])
        record = self.transform.random_map(record, rng)
        _check_finite(record)
      except DataError as e:
        if not self.skip_bad:
          raise
        skipped.append(str(e))
        continue
      record["_skipped"] = list(record.get("_skipped", [])) + skipped
      if self.mark_valid:
        record["valid"] = np.bool_(index < n and attempt == 0)
      return record
    raise DataError(f"{self.max_bad + 1} bad records in a row from index "
                    f"{index % n}; last: {skipped[-1]}")


def _stack_records(records: Sequence[dict]) -> Batch:
  """Stacks public keys; concatenates the `_skipped` reports; drops the rest."""
  batch = {"_skipped": [s for r in records for s in r["_skipped"]]}
  for key in records[0]:
    if not key.startswith("_"):
      batch[key] = np.stack([r[key] for r in records])
  return batch


class Loader:
  """An iterator of batches (dicts of numpy arrays) with a resumable state.

  `get_state()` is a small JSON-able dict (the next batch's index and the skip
  count); save one per process next to the train state. `set_state()` restarts
  the pipeline at exactly that batch, with any worker count. Call `close()` (or
  use `with`) to stop worker processes.
  """

  def __init__(self, batches: grain.MapDataset, *, batch_size: int,
               num_batches: int | None, read_options: grain.ReadOptions,
               worker_count: int, worker_buffer_size: int, name: str):
    self.batches = batches
    self.batch_size = batch_size
    self.num_batches = num_batches
    self.name = name
    self._read_options = read_options
    self._worker_count = worker_count
    self._worker_buffer_size = worker_buffer_size
    self._iterator = None
    self._next_batch = 0
    self._num_skipped = 0
    self._recent = collections.deque(maxlen=100)

  def _start(self) -> grain.DatasetIterator:
    ds = self.batches[self._next_batch:]
    it_ds = ds.to_iter_dataset(self._read_options)
    if self._worker_count > 0:
      _ensure_absl_flags_parsed()
      it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self._worker_count,
          per_worker_buffer_size=self._worker_buffer_size))
    return it_ds.__iter__()

  def __iter__(self) -> "Loader":
    return self

  def __next__(self) -> Batch:
    if self._iterator is None:
      self._iterator = self._start()
    batch = next(self._iterator)
    self._next_batch += 1
    if self._worker_count > 0:
      # Own the memory: the workers' shared-memory blocks are unmapped once
      # grain drops them, which would pull the floor from under any zero-copy
      # consumer (a CPU jax.Array, for one).
      batch = {k: np.array(v) if isinstance(v, np.ndarray) else v
               for k, v in batch.items()}
    skipped = batch.pop("_skipped")
    for reason in skipped:
      logging.warning("input_pipeline %s: skipped %s", self.name, reason)
    self._num_skipped += len(skipped)
    self._recent.extend(skipped)
    return batch

  def get_state(self) -> dict:
    return {"next_batch": self._next_batch, "skipped": self._num_skipped}

  def set_state(self, state: dict) -> None:
    self.close()
    self._next_batch = int(state["next_batch"])
    self._num_skipped = int(state["skipped"])

  @property
  def num_skipped(self) -> int:
    """Items skipped so far (bad records, bad annotations, cut instances)."""
    return self._num_skipped

  @property
  def skipped(self) -> list[str]:
    """The most recent reasons for skips."""
    return list(self._recent)

  def close(self) -> None:
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class MultitaskLoader:
  """One batch per task per step, as `{task: batch}`.

  The reference's multi-task runner draws one batch of each task's own batch
  size every step; the state holds every task's state.
  """

  def __init__(self, loaders: Mapping[str, Loader]):
    if not loaders:
      raise ValueError("MultitaskLoader needs at least one loader")
    self.loaders = dict(loaders)
    self.name = "+".join(self.loaders)
    self.batch_size = {k: l.batch_size for k, l in self.loaders.items()}
    finite = [l.num_batches for l in self.loaders.values()
              if l.num_batches is not None]
    self.num_batches = min(finite) if finite else None

  def __iter__(self) -> "MultitaskLoader":
    return self

  def __next__(self) -> dict[str, Batch]:
    return {k: next(l) for k, l in self.loaders.items()}

  def get_state(self) -> dict:
    return {k: l.get_state() for k, l in self.loaders.items()}

  def set_state(self, state: dict) -> None:
    for k, l in self.loaders.items():
      l.set_state(state[k])

  @property
  def num_skipped(self) -> int:
    return sum(l.num_skipped for l in self.loaders.values())

  @property
  def skipped(self) -> list[str]:
    return [s for l in self.loaders.values() for s in l.skipped]

  def close(self) -> None:
    for l in self.loaders.values():
      l.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; parse defaults if nobody did."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_loader(source, ops: Sequence[Any], *, train: bool,
                options: LoaderOptions, name: str = "data") -> Loader:
  """Batches of `ops` applied to the records of `source`.

  Args:
    source: a random-access source (`__len__`, `__getitem__` -> record dict).
    ops: grain Map / RandomMap transforms, applied in order.
    train: shuffle and repeat (`options.num_epochs`), dropping the remainder of
      the index space; otherwise one pass in order, padded to whole batches
      with records marked `valid=False`.
    options: batching, sharding and parallelism.
    name: task name used in skip reports.
  """
  process_index, process_count = _process_shard(options)
  if options.global_batch_size % process_count:
    raise ValueError(f"global_batch_size {options.global_batch_size} is not "
                     f"divisible by process_count {process_count}")
  batch_size = options.global_batch_size // process_count
  n = len(source)
  if train:
    share = n // process_count
    if share < batch_size:
      raise ValueError(f"{name}: {n} records give each of {process_count} "
                       f"processes {share}, fewer than a batch of {batch_size}")
    ds = grain.MapDataset.range(process_index * share,
                                (process_index + 1) * share)
    ds = ds.shuffle(seed=_derived_seed(options.seed, process_index))
    ds = ds.repeat(options.num_epochs)
    num_batches = (None if options.num_epochs is None
                   else share * options.num_epochs // batch_size)
  else:
    step = process_count * batch_size
    share = math.ceil(n / step) * step // process_count
    ds = grain.MapDataset.range(process_index * share,
                                (process_index + 1) * share)
    num_batches = share // batch_size
  ds = ds.map_with_index(_ProcessRecord(
      source, Compose(ops), seed=options.seed, process_index=process_index,
      skip_bad=options.skip_bad_records,
      max_bad=options.max_consecutive_bad, mark_valid=not train))
  return Loader(
      ds.batch(batch_size, drop_remainder=True, batch_fn=_stack_records),
      batch_size=batch_size, num_batches=num_batches,
      read_options=grain.ReadOptions(
          num_threads=options.read_threads,
          prefetch_buffer_size=options.read_buffer_size),
      worker_count=options.worker_count,
      worker_buffer_size=options.worker_buffer_size, name=name)


def make_multitask_loader(loaders: Mapping[str, Loader]) -> MultitaskLoader:
  """`{task: batch}` every step from one loader per task."""
  return MultitaskLoader(loaders)
