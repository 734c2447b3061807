"""Data for the trainer: sources from the config, and loaders split into data shards.

The global batch is cut into `num_shards` data shards (config `data.num_shards`, by
default one per process). Shard i is the input pipeline's share `i` of `num_shards`
(`LoaderOptions(process_index=i, process_count=num_shards)`), and each process reads
the shards of its own block. So the global batches depend on the number of shards,
never on the number of processes: a run keeps its data order when it moves to another
host count, and the resume state (every shard's loader state) is global.
"""

import json
import logging
import os
from collections.abc import Callable, Mapping

import jax
import numpy as np

import input_pipeline as ip
from input_pipeline import synthetic

from ait_jax.parallel import distributed


def num_shards(data_cfg) -> int:
  n = data_cfg.num_shards or jax.process_count()
  if n % jax.process_count():
    raise ValueError(f"config.data.num_shards={n} is not a multiple of the "
                     f"{jax.process_count()} processes")
  return n


def local_shards(data_cfg) -> list[int]:
  """The data shards this process reads."""
  n = num_shards(data_cfg)
  per = n // jax.process_count()
  return list(range(jax.process_index() * per, (jax.process_index() + 1) * per))


def _synthetic_spec(synthetic_cfg, layout: str) -> dict:
  """What a synthetic layout is generated from; its COMPLETE_<layout> marker holds it."""
  spec = {"layout": layout, **{k: synthetic_cfg[k]
                               for k in ("num_train", "num_test", "height", "width")}}
  if layout == "coco":
    spec["scenes"] = synthetic_cfg.coco_scenes
    if spec["scenes"] not in synthetic.SCENES:
      raise ValueError(f"config.data.synthetic.coco_scenes {spec['scenes']!r} is not one "
                       f"of {sorted(synthetic.SCENES)}")
  return spec


def write_synthetic(base: str, synthetic_cfg, layout: str) -> None:
  """Generates one synthetic layout ('nyu' or 'coco') into `base`, then its marker."""
  spec = _synthetic_spec(synthetic_cfg, layout)
  logging.info("generating the synthetic %s dataset into %s: %s", layout, base, spec)
  size = spec["num_train"], spec["num_test"], spec["height"], spec["width"]
  if layout == "nyu":
    synthetic.write_nyu(base, *size, seed=0)
  else:
    synthetic.write_coco(base, *size, seed=0, scenes=spec["scenes"])
  with open(os.path.join(base, f"COMPLETE_{layout}"), "w") as f:
    json.dump(spec, f)


def synthetic_root(data_cfg, workdir: str, layout: str) -> str:
  """Generates one synthetic layout ('nyu' or 'coco') once (process 0); returns its
  root directory. Data generated from other settings than the config's is an error."""
  # On every process, before the barrier: a bad config key must not strand the others.
  wanted = _synthetic_spec(data_cfg.synthetic, layout)
  base = data_cfg.synthetic_dir or os.path.join(workdir, "data", "synthetic")
  done = os.path.join(base, f"COMPLETE_{layout}")
  if jax.process_index() == 0 and not os.path.exists(done):
    write_synthetic(base, data_cfg.synthetic, layout)
  distributed.barrier(f"synthetic_{layout}")
  if not os.path.exists(done):
    raise FileNotFoundError(f"{done} is missing: the synthetic data must be on a file "
                            "system all processes share (config.data.synthetic_dir)")
  with open(done) as f:
    text = f.read()
  try:
    found = json.loads(text)
  except json.JSONDecodeError:
    found = text.strip()
  if found != wanted:
    raise ValueError(f"the synthetic {layout} data in {base} was generated with {found}, "
                     f"but config.data.synthetic asks for {wanted}: point "
                     "config.data.synthetic_dir elsewhere or delete that directory")
  return os.path.join(base, "nyu_depth_v2" if layout == "nyu" else "coco")


def coco_split(data_cfg, source_cfg, workdir: str, split: str,
               what: str) -> tuple[str, str]:
  """(instances JSON, image directory) of a COCO-layout source (`coco` or `synthetic`)
  for split 'train' (train2017) or 'test' (val2017)."""
  if source_cfg.kind == "synthetic":
    root = synthetic_root(data_cfg, workdir, "coco")
  elif source_cfg.kind == "coco":
    root = source_cfg.root
  else:
    raise ValueError(f"{what} source kind {source_cfg.kind!r} is not 'coco' or 'synthetic'")
  name = "train2017" if split == "train" else "val2017"
  return os.path.join(root, "annotations", f"instances_{name}.json"), os.path.join(root, name)


def nyu_source(source_cfg, data_cfg, workdir: str, split: str, load_image: bool = True):
  """An `NyuDepthSource` for a task's `source` config ('nyu' or 'synthetic')."""
  if source_cfg.kind == "synthetic":
    root = synthetic_root(data_cfg, workdir, "nyu")
  elif source_cfg.kind == "nyu":
    root = source_cfg.root
  else:
    raise ValueError(f"depth source kind {source_cfg.kind!r} is not 'nyu' or 'synthetic'")
  list_file = (source_cfg.train_list if split == "train" else source_cfg.test_list) or None
  return ip.NyuDepthSource(root, split, list_file=list_file, load_image=load_image)


def loader_options(data_cfg, batch_size: int, shard: int, seed: int) -> ip.LoaderOptions:
  return ip.LoaderOptions(
      global_batch_size=batch_size, seed=seed, worker_count=data_cfg.worker_count,
      read_threads=data_cfg.read_threads, process_index=shard,
      process_count=num_shards(data_cfg), skip_bad_records=data_cfg.skip_bad_records)


class ShardedData:
  """Per task, the loaders of this process's shards; each step `{task: batch}`.

  A batch is this process's rows: its shards' batches concatenated in shard order.
  `get_state()` gathers every shard's loader state from every process (a collective);
  `set_state()` takes such a state and gives each loader its own.
  """

  def __init__(self, loaders: Mapping[str, Mapping[int, ip.Loader]],
               prepare: Mapping[str, Callable] | None = None):
    self.loaders = {t: dict(v) for t, v in loaders.items()}
    self.prepare = dict(prepare or {})

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for task, shards in self.loaders.items():
      batches = [self._next(task, s, shards[s]) for s in sorted(shards)]
      out[task] = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    return out

  def _next(self, task: str, shard: int, loader: ip.Loader) -> dict:
    batch = next(loader)
    if task in self.prepare:
      batch = self.prepare[task](batch, shard, loader.get_state()["next_batch"])
    return batch

  def get_state(self) -> dict:
    mine = {t: {str(s): l.get_state() for s, l in shards.items()}
            for t, shards in self.loaders.items()}
    merged: dict = {}
    for part in distributed.allgather_json(mine):
      for t, states in part.items():
        merged.setdefault(t, {}).update(states)
    return merged

  def set_state(self, state: Mapping) -> None:
    for t, shards in self.loaders.items():
      if t not in state:
        raise ValueError(f"the checkpoint has no data state for task {t!r}; it holds "
                         f"{sorted(state)}")
      for s, loader in shards.items():
        if str(s) not in state[t]:
          raise ValueError(
              f"the checkpoint's data state has shards {sorted(state[t], key=int)} of "
              f"task {t!r}, not shard {s}: restore with the same config.data.num_shards")
        loader.set_state(state[t][str(s)])

  def close(self) -> None:
    for shards in self.loaders.values():
      for loader in shards.values():
        loader.close()


def make_data(make_loader: Mapping[str, Callable[[int], ip.Loader]], data_cfg,
              prepare: Mapping[str, Callable] | None = None) -> ShardedData:
  """`make_loader[task](shard)` for each task and each of this process's shards;
  `prepare[task](batch, shard, position)` turns a loaded batch into the step's."""
  return ShardedData({t: {s: fn(s) for s in local_shards(data_cfg)}
                      for t, fn in make_loader.items()}, prepare)
