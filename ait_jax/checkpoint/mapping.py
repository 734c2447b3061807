"""Declarative mapping between a reference PyTorch state_dict and Flax variables.

A model's mapping is a list of entries, one per reference key, in the reference's
state_dict order:

* `Param`: a tensor stored in both worlds, with the layout change between them
  (`linear`: (out, in) <-> (in, out); `conv`: OIHW <-> HWIO; `conv_transpose`:
  IOHW <-> spatially flipped HWIO; `reshape`: same values, other shape; `copy`).
  Several keys may name one Flax leaf (the reference registers its transformer once per
  head); they must then hold identical values.
* `Buffer`: a value the reference derives from the config (position indices, coordinate
  tables, sine tables, class weights). It is recomputed here, written on export, and on
  import checked for equality when present.

`to_flax` collects every problem of a file (missing keys, unexpected keys, shape
mismatches, buffers that disagree) and raises them together in one `StateDictMismatch`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

LAYOUTS = ("copy", "linear", "conv", "conv_transpose", "reshape")


@dataclasses.dataclass(frozen=True)
class Param:
  torch_key: str
  flax_path: tuple[str, ...]  # starts with the collection: ('params', 'layers_0', ...)
  layout: str
  torch_shape: tuple[int, ...]
  flax_shape: tuple[int, ...]

  def __post_init__(self):
    if self.layout not in LAYOUTS:
      raise ValueError(f"{self.torch_key}: unknown layout {self.layout!r}")


@dataclasses.dataclass(frozen=True)
class Buffer:
  torch_key: str
  value: np.ndarray
  # Index buffers are compared exactly; float tables within this tolerance.
  atol: float = 0.0


Entry = Param | Buffer


def param(torch_key: str, flax_path: Sequence[str], flax_shape: Sequence[int],
          layout: str = "copy", torch_shape: Sequence[int] | None = None) -> Param:
  """A `Param` whose torch shape follows from the Flax shape and the layout."""
  flax_shape = tuple(int(d) for d in flax_shape)
  if torch_shape is None:
    if layout == "reshape":
      raise ValueError(f"{torch_key}: layout 'reshape' needs torch_shape")
    torch_shape = _torch_shape(flax_shape, layout)
  return Param(torch_key, tuple(flax_path), layout, tuple(int(d) for d in torch_shape),
               flax_shape)


def _torch_shape(flax_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  if layout == "copy":
    return flax_shape
  if layout == "linear":
    return flax_shape[::-1]
  if layout == "conv":
    kh, kw, cin, cout = flax_shape
    return (cout, cin, kh, kw)
  if layout == "conv_transpose":
    kh, kw, cin, cout = flax_shape
    return (cin, cout, kh, kw)
  raise ValueError(layout)


def torch_to_flax_array(p: Param, value: np.ndarray) -> np.ndarray:
  if p.layout in ("copy", "reshape"):
    return np.reshape(value, p.flax_shape)
  if p.layout == "linear":
    return np.ascontiguousarray(value.T)
  if p.layout == "conv":
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
  # conv_transpose: torch's kernel is the gradient-of-conv kernel; Flax's ConvTranspose
  # (transpose_kernel=False) convolves the dilated input directly, so flip it in space.
  return np.ascontiguousarray(value.transpose(2, 3, 0, 1)[::-1, ::-1])


def flax_to_torch_array(p: Param, value: np.ndarray) -> np.ndarray:
  if p.layout in ("copy", "reshape"):
    return np.reshape(value, p.torch_shape)
  if p.layout == "linear":
    return np.ascontiguousarray(value.T)
  if p.layout == "conv":
    return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
  return np.ascontiguousarray(value[::-1, ::-1].transpose(2, 3, 0, 1))


class StateDictMismatch(ValueError):
  """A state_dict that does not fit the model; the message lists every problem."""

  def __init__(self, source: str, missing=(), unexpected=(), shape=(), value=()):
    self.missing, self.unexpected = list(missing), list(unexpected)
    self.shape, self.value = list(shape), list(value)
    lines = [f"{source}: the weights do not fit the model."]
    if self.missing:
      lines.append(f"missing keys ({len(self.missing)}): " + ", ".join(self.missing))
    if self.unexpected:
      lines.append(f"unexpected keys ({len(self.unexpected)}): "
                   + ", ".join(self.unexpected))
    for key, got, want in self.shape:
      lines.append(f"shape mismatch: {key} has {tuple(got)}, the model needs {tuple(want)}")
    for key, why in self.value:
      lines.append(f"value mismatch: {key}: {why}")
    super().__init__("\n".join(lines))


def prefixed(entries: Iterable[Entry], torch_prefix: str,
             flax_scope: Sequence[str] = (), flax_root: Sequence[str] = ()) -> list[Entry]:
  """Entries of a submodule placed under `torch_prefix`.

  On the Flax side the submodule's variables move to scope `flax_scope` inside each
  collection, and the whole tree under the keys `flax_root`:
  `(*flax_root, collection, *flax_scope, ...)`.
  """
  out = []
  for e in entries:
    if isinstance(e, Param):
      path = (*flax_root, e.flax_path[0], *flax_scope, *e.flax_path[1:])
      out.append(dataclasses.replace(e, torch_key=torch_prefix + e.torch_key,
                                     flax_path=path))
    else:
      out.append(dataclasses.replace(e, torch_key=torch_prefix + e.torch_key))
  return out


def to_flax(state_dict: Mapping[str, np.ndarray], entries: Sequence[Entry], *,
            source: str = "state_dict", allow_missing: bool = False) -> dict:
  """Nested Flax variables from a reference state_dict.

  Raises `StateDictMismatch` naming every missing key, unexpected key, shape
  mismatch and disagreeing buffer. Derived buffers may be absent (the reference's own
  backbone loader drops them). With `allow_missing`, missing parameters are left out
  of the result instead (the caller reports them).
  """
  known = {e.torch_key for e in entries}
  unexpected = [k for k in state_dict if k not in known]
  missing, bad_shape, bad_value = [], [], []
  flat: dict[tuple[str, ...], np.ndarray] = {}
  first_key: dict[tuple[str, ...], str] = {}
  for e in entries:
    if isinstance(e, Buffer):
      if e.torch_key in state_dict:
        _check_buffer(e, np.asarray(state_dict[e.torch_key]), bad_shape, bad_value)
      continue
    if e.torch_key not in state_dict:
      if not allow_missing:
        missing.append(e.torch_key)
      continue
    value = np.asarray(state_dict[e.torch_key])
    if tuple(value.shape) != e.torch_shape:
      bad_shape.append((e.torch_key, value.shape, e.torch_shape))
      continue
    value = torch_to_flax_array(e, value)
    if e.flax_path in flat:
      if not np.array_equal(flat[e.flax_path], value):
        bad_value.append((e.torch_key, f"differs from {first_key[e.flax_path]}, "
                          "which the model shares with it"))
      continue
    flat[e.flax_path] = value
    first_key[e.flax_path] = e.torch_key
  if missing or unexpected or bad_shape or bad_value:
    raise StateDictMismatch(source, missing, unexpected, bad_shape, bad_value)
  return unflatten(flat)


def _check_buffer(e: Buffer, value: np.ndarray, bad_shape: list, bad_value: list):
  want = np.asarray(e.value)
  if value.shape != want.shape:
    bad_shape.append((e.torch_key, value.shape, want.shape))
  elif e.atol == 0.0 and not np.array_equal(value, want):
    bad_value.append((e.torch_key, "differs from the value derived from the config"))
  elif e.atol > 0.0 and not np.allclose(value, want, rtol=0.0, atol=e.atol):
    err = float(np.max(np.abs(value.astype(np.float64) - want)))
    bad_value.append((e.torch_key, f"differs from the value derived from the config "
                      f"by up to {err:.3g} (allowed {e.atol:g})"))


def to_torch(variables: Mapping, entries: Sequence[Entry]) -> dict[str, np.ndarray]:
  """The reference state_dict (numpy arrays, reference order) of Flax variables."""
  flat = flatten(variables)
  out: dict[str, np.ndarray] = {}
  missing = []
  for e in entries:
    if isinstance(e, Buffer):
      out[e.torch_key] = np.asarray(e.value)
    elif e.flax_path not in flat:
      missing.append("/".join(e.flax_path))
    else:
      out[e.torch_key] = flax_to_torch_array(e, np.asarray(flat[e.flax_path]))
  if missing:
    raise StateDictMismatch("Flax variables", missing=missing)
  return out


def flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat: Mapping[tuple[str, ...], object]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def check_covers(entries: Sequence[Entry], abstract_variables: Mapping,
                 collections: Sequence[str] = ("params",)) -> None:
  """Assert every Flax leaf of `collections` is named by some Param, with its shape.

  Catches a mapping that forgets a parameter, which `to_flax` alone would not.
  """
  flat = {p: v for p, v in flatten(abstract_variables).items() if p[0] in collections}
  mapped = {e.flax_path: e for e in entries if isinstance(e, Param)}
  problems = [f"{'/'.join(p)} is not mapped" for p in flat if p not in mapped]
  problems += [f"{e.torch_key} -> {'/'.join(p)} names no Flax leaf"
               for p, e in mapped.items() if p[0] in collections and p not in flat]
  problems += [f"{e.torch_key}: Flax shape {tuple(flat[p].shape)} != {e.flax_shape}"
               for p, e in mapped.items() if p in flat
               and tuple(flat[p].shape) != e.flax_shape]
  if problems:
    raise AssertionError("mapping does not cover the model:\n" + "\n".join(problems))
