"""Composition of grain transforms over record dicts.

A record is a dict of numpy arrays: `image` (uint8 H x W x 3 until it is
converted to float), and task targets that move with it (`depth`, `boxes`,
`labels`, `masks`, ...). Keys starting with `_` are bookkeeping (for example
`_position`, the record's place in this process's stream) and never reach a
batch.
"""

from typing import Any, Sequence

import grain
import numpy as np

Record = dict[str, Any]


class Compose(grain.transforms.RandomMap):
  """Runs grain `Map` and `RandomMap` transforms in order with one generator.

  Like albumentations' `Compose`: the generator is consumed by each random op
  in turn, so a record's augmentation is a pure function of its seed. The ops
  draw from numpy's Generator with the reference's distributions; the streams
  themselves (Python `random`, numpy's global state) are not reproduced.
  """

  def __init__(self, ops: Sequence[grain.transforms.Map
                                   | grain.transforms.RandomMap]):
    for op in ops:
      if not isinstance(op, (grain.transforms.Map, grain.transforms.RandomMap)):
        raise TypeError(f"{op!r} is not a grain Map or RandomMap transform")
    self.ops = tuple(ops)

  def random_map(self, element: Record, rng: np.random.Generator) -> Record:
    for op in self.ops:
      if isinstance(op, grain.transforms.RandomMap):
        element = op.random_map(element, rng)
      else:
        element = op.map(element)
    return element

  def __repr__(self) -> str:
    return f"Compose({list(self.ops)!r})"


class DropKeys(grain.transforms.Map):
  """Removes keys a task does not use (e.g. the image for the depth tokenizer)."""

  def __init__(self, keys: Sequence[str]):
    self.keys = tuple(keys)

  def map(self, element: Record) -> Record:
    return {k: v for k, v in element.items() if k not in self.keys}


class AddChannel(grain.transforms.Map):
  """(H, W) maps -> float32 (H, W, 1), the NHWC layout of single-channel inputs."""

  def __init__(self, keys: Sequence[str]):
    self.keys = tuple(keys)

  def map(self, element: Record) -> Record:
    return {**element, **{k: np.asarray(element[k], np.float32)[..., None]
                          for k in self.keys}}
