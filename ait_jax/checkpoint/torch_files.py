"""Reference weight files: read without running code from them, written for PyTorch.

A reference checkpoint is a state_dict, a flat map from the reference's parameter names
to arrays, often inside a wrapper. Files are read from
* `.safetensors` and `.npz` (numpy only);
* PyTorch files (`torch.save`): with `torch.load(weights_only=True)` when torch is
  installed; without torch, zip-format files go through this module's own unpickler,
  which knows only tensors, numbers, strings and plain containers.
A pickle that names anything else (a class or function that would run when loaded) is
refused with `UnsafeCheckpointError`, whichever way it is read.

`read_state_dict` also takes off the wrappers the reference's loaders accept: mmcv's
`{'state_dict': ...}`, SimMIM's `{'model': ...}`, the VQ-VAE scripts' `{'weights': ...}`
and `{'module': ...}`, and DistributedDataParallel's `module.` key prefix; each step is
recorded in the result's `notes`.

Writing: `.safetensors` always (numpy), a `torch.save` file when torch is installed.
"""

import codecs
import collections
import dataclasses
import io
import math
import os
import pickle
import zipfile
from collections.abc import Mapping

import ml_dtypes
import numpy as np

# Entries that hold the state_dict, in the order the reference's loaders look for them.
WRAPPER_KEYS = ("state_dict", "model", "weights", "module")
DDP_PREFIX = "module."
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64,
    "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_SAFE_HINT = (
    "Only tensors, numbers, strings and plain containers are read from a pickle. If you "
    "trust the file, extract its weights with torch, e.g. `ckpt = torch.load(F, "
    "weights_only=False); torch.save(ckpt['state_dict'], 'weights.pth')` (or "
    "ckpt['model'], or safetensors), and convert that file.")


class UnsafeCheckpointError(ValueError):
  """A pickle that would construct objects other than tensors and plain data."""


@dataclasses.dataclass
class StateDictFile:
  """A state_dict read from `path`, and how it was taken out of the file."""
  path: str
  state_dict: dict[str, np.ndarray]
  notes: list[str]


def torch_available() -> bool:
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


# --- reading --------------------------------------------------------------------------

def read_file(path: str):
  """The object a weights file holds, tensors as numpy arrays."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  with open(path, "rb") as f:
    head = f.read(9)
  if path.endswith(".safetensors") or _looks_like_safetensors(head):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return load_file(path)
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as z:
      names = z.namelist()
    if names and all(n.endswith(".npy") for n in names):
      with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
    return _read_torch(path, is_zip=True)
  return _read_torch(path, is_zip=False)


def _looks_like_safetensors(head: bytes) -> bool:
  # An 8-byte little-endian header size, then the JSON header.
  return len(head) == 9 and head[8:9] == b"{"


def _read_torch(path: str, is_zip: bool):
  if torch_available():
    return _read_with_torch(path)
  if not is_zip:
    raise ValueError(
        f"{path}: not a zip-format PyTorch file (a legacy torch.save file or another "
        "pickle). Without torch only zip-format files are read; install torch "
        "(pip install 'ait-jax[torch]') to read it with weights_only=True, or convert it "
        "to safetensors.")
  return read_torch_zip(path)


def _read_with_torch(path: str):
  import torch  # pylint: disable=g-import-not-at-top
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise UnsafeCheckpointError(
        f"{path}: refused: torch.load(weights_only=True) would not read it ({e}). "
        + _SAFE_HINT) from None

  def to_numpy(x):
    if isinstance(x, torch.Tensor):
      x = x.detach().cpu()
      if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
      return x.numpy()
    if isinstance(x, Mapping):
      return {k: to_numpy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return type(x)(to_numpy(v) for v in x)
    return x

  return to_numpy(obj)


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: np.dtype


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """An array viewing `storage` as torch's `_rebuild_tensor_v2` does, bounds checked."""
  del unused  # requires_grad, backward hooks, metadata
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if (not isinstance(storage, np.ndarray) or len(size) != len(stride) or offset < 0
      or min(size + stride, default=0) < 0):
    raise ValueError("malformed tensor record")
  if math.prod(size) == 0:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise ValueError(f"tensor of size {size} at offset {offset} runs past its storage "
                     f"of {storage.size} elements")
  view = np.lib.stride_tricks.as_strided(storage[offset:], size,
                                         [s * storage.itemsize for s in stride],
                                         writeable=False)
  return np.array(view)


def _rebuild_parameter(data, *unused):
  del unused
  return data


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
  # Protocol-2 pickles store bytes as `_codecs.encode(text, 'latin1')`.
  if encoding not in ("latin1", "latin-1"):
    raise ValueError(f"unexpected encoding {encoding!r}")
  return codecs.encode(text, "latin1")


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "Counter"): collections.Counter,
    **{(module, f.__name__): f for module in ("builtins", "__builtin__")
       for f in (set, frozenset, bytearray, complex)},
    ("_codecs", "encode"): _latin1_bytes,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("torch", "device"): lambda *args: ":".join(str(a) for a in args),
    **{("torch", name): _StorageType(np.dtype(dt)) for name, dt in _STORAGE_DTYPES.items()},
}


class _WeightsUnpickler(pickle.Unpickler):
  """Builds only what `_ALLOWED_GLOBALS` names; storages come from `load_storage`."""

  def __init__(self, data: bytes, path: str, load_storage):
    super().__init__(io.BytesIO(data))
    self._path, self._load_storage = path, load_storage

  def find_class(self, module, name):
    found = _ALLOWED_GLOBALS.get((module, name))
    if found is None:
      raise UnsafeCheckpointError(
          f"{self._path}: refused: the pickle names {module}.{name}, which could run code "
          "when loaded. " + _SAFE_HINT)
    return found

  def persistent_load(self, pid):
    if (not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage"
        or not isinstance(pid[1], _StorageType)):
      raise UnsafeCheckpointError(f"{self._path}: refused: unknown persistent record "
                                  f"{pid!r:.80}. " + _SAFE_HINT)
    _, storage_type, key, _, numel = pid[:5]
    return self._load_storage(str(key), storage_type.dtype, int(numel))


def read_torch_zip(path: str):
  """A zip-format `torch.save` file, read without torch."""
  with zipfile.ZipFile(path) as z:
    names = z.namelist()
  pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
  if len(pickles) != 1:
    raise ValueError(f"{path}: not a PyTorch zip file (no single data.pkl among "
                     f"{names[:5]})")
  root = pickles[0][:-len("data.pkl")]
  with zipfile.ZipFile(path) as z:
    order = "little"
    if root + "byteorder" in names:
      order = z.read(root + "byteorder").decode().strip()
    storages = {}

    def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
      if key not in storages:
        raw = z.read(f"{root}data/{key}")
        if len(raw) != numel * dtype.itemsize:
          raise ValueError(f"{path}: storage {key} holds {len(raw)} bytes, not "
                           f"{numel} x {dtype.itemsize}")
        stored = dtype.newbyteorder("<" if order == "little" else ">")
        storages[key] = np.frombuffer(raw, stored).astype(dtype, copy=False)
      return storages[key]

    return _WeightsUnpickler(z.read(pickles[0]), path, load_storage).load()


def _is_array(x) -> bool:
  return isinstance(x, np.ndarray)


def unwrap_state_dict(obj, source: str) -> tuple[dict[str, np.ndarray], list[str]]:
  """The flat state_dict inside a loaded file, and notes on what was taken off."""
  notes = []
  while True:
    if not isinstance(obj, Mapping):
      raise ValueError(f"{source}: holds a {type(obj).__name__}, not a state_dict")
    if obj and all(_is_array(v) for v in obj.values()):
      break
    key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if key is None:
      bad = sorted(f"{k} ({type(v).__name__})" for k, v in obj.items() if not _is_array(v))
      raise ValueError(
          f"{source}: no state_dict found: entries that are not tensors: "
          f"{', '.join(bad[:10]) or 'none (the file is empty)'}; expected a flat map of "
          f"tensors, or one inside {' / '.join(repr(k) for k in WRAPPER_KEYS)}")
    others = sorted(str(k) for k in obj if k != key)
    notes.append(f"took the state_dict from the {key!r} entry"
                 + (f" (not read: {', '.join(others)})" if others else ""))
    obj = obj[key]
  sd = {str(k): v for k, v in obj.items()}
  prefixed = [k for k in sd if k.startswith(DDP_PREFIX)]
  if prefixed:
    stripped = {k[len(DDP_PREFIX):] if k.startswith(DDP_PREFIX) else k: v
                for k, v in sd.items()}
    if len(stripped) != len(sd):
      raise ValueError(f"{source}: keys differ only by the {DDP_PREFIX!r} prefix")
    sd = stripped
    notes.append(f"removed the {DDP_PREFIX!r} prefix (DistributedDataParallel) from "
                 f"{len(prefixed)} keys")
  return sd, notes


def read_state_dict(path: str) -> StateDictFile:
  """The state_dict in a reference weights file (see the module docstring)."""
  sd, notes = unwrap_state_dict(read_file(path), path)
  return StateDictFile(path, sd, notes)


# --- writing --------------------------------------------------------------------------

def output_paths(out: str) -> tuple[str, str]:
  """(safetensors path, torch path) for `--out`: one stem, both formats."""
  stem, ext = os.path.splitext(out)
  if ext == ".safetensors":
    return out, stem + ".pth"
  if ext in TORCH_SUFFIXES:
    return stem + ".safetensors", out
  return out + ".safetensors", out + ".pth"


def write_safetensors(path: str, state_dict: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  tensors = {k: np.asarray(v, order="C") for k, v in state_dict.items()}
  save_file(tensors, path, metadata={"format": "pt", **(metadata or {})})


def write_torch(path: str, state_dict: Mapping[str, np.ndarray]) -> None:
  """A `torch.save` file of the plain state_dict (needs torch)."""
  import torch  # pylint: disable=g-import-not-at-top
  sd = collections.OrderedDict(
      (k, torch.from_numpy(np.array(v, copy=True, order="C"))) for k, v in state_dict.items())
  torch.save(sd, path)


def write_state_dict(out: str, state_dict: Mapping[str, np.ndarray],
                     metadata: Mapping[str, str] | None = None) -> list[str]:
  """Writes `.safetensors`, and a torch file when torch is installed; the paths."""
  st_path, torch_path = output_paths(out)
  for p in (st_path, torch_path):
    os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
  write_safetensors(st_path, state_dict, metadata)
  written = [st_path]
  if torch_available():
    write_torch(torch_path, state_dict)
    written.append(torch_path)
  return written
