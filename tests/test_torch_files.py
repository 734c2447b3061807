"""Reading and writing reference weight files: formats, wrappers, and refusing code.

`write_torch_zip` below writes the zip format of `torch.save` without torch (the same
pickle opcodes torch emits), so the torch-free reader is tested everywhere; with torch
installed the same files are checked against `torch.load` too.
"""

import os
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from ait_jax.checkpoint import torch_files
from ait_jax.checkpoint.torch_files import UnsafeCheckpointError

_STORAGES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
             np.dtype(np.float16): "HalfStorage", np.dtype(ml_dtypes.bfloat16):
             "BFloat16Storage", np.dtype(np.int64): "LongStorage",
             np.dtype(np.int32): "IntStorage", np.dtype(np.uint8): "ByteStorage",
             np.dtype(np.bool_): "BoolStorage"}


class _TorchPickle:
  """Protocol-2 pickle opcodes as `torch.save` writes them."""

  def __init__(self, transposed: bool):
    self.out = bytearray(b"\x80\x02")
    self.storages: list[np.ndarray] = []
    self.transposed = transposed

  def glob(self, module: str, name: str):
    self.out += f"c{module}\n{name}\n".encode()

  def emit(self, x):
    if isinstance(x, np.ndarray):
      self.tensor(x)
    elif isinstance(x, dict):
      self.glob("collections", "OrderedDict")
      self.out += b")R"
      if x:
        self.out += b"("
        for k, v in x.items():
          self.emit(k)
          self.emit(v)
        self.out += b"u"
    elif isinstance(x, str):
      data = x.encode()
      self.out += b"X" + struct.pack("<I", len(data)) + data
    elif isinstance(x, bool):
      self.out += b"\x88" if x else b"\x89"
    elif isinstance(x, int):
      self.out += b"J" + struct.pack("<i", x)
    elif isinstance(x, tuple):
      self.out += b"("
      for v in x:
        self.emit(v)
      self.out += b"t"
    else:
      raise TypeError(type(x))

  def tensor(self, a: np.ndarray):
    # A 2-D tensor may be stored as the transpose of a contiguous storage (what
    # `weight.t()` saves), to exercise strides.
    flip = self.transposed and a.ndim == 2
    stored = np.ascontiguousarray(a.T if flip else a)
    key = str(len(self.storages))
    self.storages.append(stored)
    strides = ((1, a.shape[0]) if flip else
               tuple(s // max(a.itemsize, 1) for s in np.empty(a.shape, a.dtype).strides))
    self.glob("torch._utils", "_rebuild_tensor_v2")
    self.out += b"(("
    self.emit("storage")
    self.glob("torch", _STORAGES[a.dtype])
    self.emit(key)
    self.emit("cpu")
    self.emit(int(a.size))
    self.out += b"tQ"
    self.emit(0)
    self.emit(tuple(int(d) for d in a.shape))
    self.emit(strides)
    self.emit(False)
    self.glob("collections", "OrderedDict")
    self.out += b")RtR"


def write_torch_zip(path, obj, *, transposed: bool = False):
  """A `torch.save`-format zip file of `obj` (dicts, tensors as numpy, str, int)."""
  p = _TorchPickle(transposed)
  p.emit(obj)
  _write_zip(path, bytes(p.out) + b".", p.storages)


def _write_zip(path, pickle_bytes: bytes, storages):
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", pickle_bytes)
    z.writestr("archive/byteorder", "little")
    for i, s in enumerate(storages):
      z.writestr(f"archive/data/{i}", s.tobytes())
    z.writestr("archive/version", "3\n")


def _sample():
  rng = np.random.default_rng(0)
  return {"layer.weight": rng.normal(size=(3, 5)).astype(np.float32),
          "layer.bias": rng.normal(size=(3,)).astype(np.float32),
          "index": np.arange(12, dtype=np.int64).reshape(3, 4),
          "half": rng.normal(size=(2, 2)).astype(np.float16),
          "bf16": rng.normal(size=(4,)).astype(ml_dtypes.bfloat16),
          "flag": np.array([True, False]),
          "scalar": np.array(2.5, np.float32),
          "empty": np.zeros((0, 3), np.float32)}


def _assert_same(got: dict, want: dict):
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
    np.testing.assert_array_equal(got[k], v, err_msg=k)


@pytest.mark.parametrize("transposed", [False, True])
def test_torch_zip_read_without_torch(tmp_path, transposed):
  sd = _sample()
  path = tmp_path / "w.pth"
  write_torch_zip(path, {"state_dict": sd, "meta": {"iter": 7, "config": "x = 1"}},
                  transposed=transposed)
  loaded = torch_files.read_torch_zip(str(path))
  _assert_same(loaded["state_dict"], sd)
  assert loaded["meta"] == {"iter": 7, "config": "x = 1"}


def test_safetensors_and_npz(tmp_path):
  sd = {k: v for k, v in _sample().items() if v.dtype != ml_dtypes.bfloat16}
  torch_files.write_safetensors(str(tmp_path / "w.safetensors"), sd)
  _assert_same(torch_files.read_state_dict(str(tmp_path / "w.safetensors")).state_dict, sd)
  np.savez(tmp_path / "w.npz", **sd)
  _assert_same(torch_files.read_state_dict(str(tmp_path / "w.npz")).state_dict, sd)


def test_unwrapping_as_the_reference_loaders_do(tmp_path):
  sd = {"a.weight": np.ones((2, 2), np.float32), "b": np.zeros((3,), np.float32)}
  ddp = {f"module.{k}": v for k, v in sd.items()}
  cases = {
      "mmcv": {"meta": {"iter": 3}, "state_dict": ddp, "optimizer": {"state": {}}},
      "simmim": {"model": sd, "epoch": 99},
      "vqvae_script": {"weights": ddp},
      "vqvae_module": {"weights": {"module": sd}},
      "raw": sd,
  }
  for name, obj in cases.items():
    path = tmp_path / f"{name}.pth"
    write_torch_zip(path, obj)
    got = torch_files.unwrap_state_dict(torch_files.read_torch_zip(str(path)), name)
    _assert_same(got[0], sd)
  _, notes = torch_files.unwrap_state_dict(cases["mmcv"], "mmcv")
  assert notes == ["took the state_dict from the 'state_dict' entry (not read: meta, "
                   "optimizer)", "removed the 'module.' prefix (DistributedDataParallel) "
                   "from 2 keys"]
  with pytest.raises(ValueError, match=r"no state_dict found.*epoch \(int\)"):
    torch_files.unwrap_state_dict({"epoch": 1, "lr": np.ones(1)}, "f")


def _marker_pickle(marker: str) -> bytes:
  """A pickle that, if loaded by plain `pickle`, creates the directory `marker`."""
  data = marker.encode()
  return (b"\x80\x02cos\nmakedirs\nX" + struct.pack("<I", len(data)) + data + b"\x85R.")


def test_pickle_carrying_code_is_refused_without_running_it(tmp_path):
  marker = tmp_path / "ran"
  path = tmp_path / "evil.pth"
  _write_zip(path, _marker_pickle(str(marker)), [])
  with pytest.raises(UnsafeCheckpointError, match=r"os\.makedirs.*could run code"):
    torch_files.read_torch_zip(str(path))
  with pytest.raises(ValueError):  # through torch.load(weights_only=True) if installed
    torch_files.read_state_dict(str(path))
  plain = tmp_path / "evil.pkl"
  plain.write_bytes(_marker_pickle(str(marker)))
  with pytest.raises(ValueError):
    torch_files.read_state_dict(str(plain))
  assert not marker.exists()


def test_tensor_past_its_storage_is_refused(tmp_path):
  p = _TorchPickle(False)
  p.emit({"w": np.zeros((2, 2), np.float32)})
  # Strides (9, 1) for a (2, 2) tensor over a 4-element storage.
  strides = b"J" + struct.pack("<i", 2) + b"J" + struct.pack("<i", 1) + b"t"
  pkl = bytes(p.out).replace(strides, b"J" + struct.pack("<i", 9) + strides[5:], 1)
  _write_zip(tmp_path / "bad.pth", pkl + b".", p.storages)
  with pytest.raises(ValueError, match="runs past its storage"):
    torch_files.read_torch_zip(str(tmp_path / "bad.pth"))


def test_output_paths():
  assert torch_files.output_paths("a/m") == ("a/m.safetensors", "a/m.pth")
  assert torch_files.output_paths("m.pth") == ("m.safetensors", "m.pth")
  assert torch_files.output_paths("m.safetensors") == ("m.safetensors", "m.pth")


# --- with torch -----------------------------------------------------------------------

def test_torch_files_agree_with_torch(tmp_path):
  torch = pytest.importorskip("torch")
  sd = _sample()
  ours = tmp_path / "ours.pth"
  write_torch_zip(ours, {"state_dict": sd}, transposed=True)
  # torch reads the files written above ...
  loaded = torch.load(ours, weights_only=True)["state_dict"]
  assert loaded["layer.weight"].stride() == (1, 3)
  np.testing.assert_array_equal(loaded["layer.weight"].numpy(), sd["layer.weight"])
  # ... and both readers agree on what torch.save writes.
  real = tmp_path / "real.pth"
  torch.save({"state_dict": {k: torch.from_numpy(v.copy()) if v.dtype != ml_dtypes.bfloat16
                             else torch.from_numpy(v.view(np.int16).copy()).view(
                                 torch.bfloat16) for k, v in sd.items()},
              "meta": {"iter": 7}}, real)
  _assert_same(torch_files.read_torch_zip(str(real))["state_dict"], sd)
  _assert_same(torch_files.read_state_dict(str(real)).state_dict, sd)
  # write_state_dict writes both formats, each loadable by torch.
  st_path, pth_path = torch_files.write_state_dict(str(tmp_path / "out"), {
      k: v for k, v in sd.items() if v.dtype != ml_dtypes.bfloat16})
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  for got in (load_file(st_path), torch.load(pth_path, weights_only=True)):
    assert got["index"].dtype == torch.int64
    np.testing.assert_array_equal(got["layer.weight"].numpy(), sd["layer.weight"])


class _RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.makedirs, (self.marker,)


def test_torch_save_with_code_is_refused(tmp_path):
  torch = pytest.importorskip("torch")
  marker = tmp_path / "ran"
  path = tmp_path / "evil.pth"
  torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": _RunsCode(str(marker))}, path)
  with pytest.raises(UnsafeCheckpointError, match="refused"):
    torch_files.read_state_dict(str(path))
  with pytest.raises(UnsafeCheckpointError, match="refused"):
    torch_files.read_torch_zip(str(path))
  assert not marker.exists()
