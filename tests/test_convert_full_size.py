"""Full-size reference models through the reference file formats.

For every manifest fixture (the reference's full-size configs), zero weights of the
model's parameter shapes (the shapes `jax.eval_shape` gives the modules:
test_reference_parity's test_manifest checks the mapping covers them) are written as a
reference file and read back: the file holds exactly the manifest's keys, shapes and
dtypes, and importing it gives every parameter back bit for bit. With torch, a torch
module with the manifest's keys and shapes loads the state_dict with `strict=True`; for
the largest model it also goes through a `torch.save` file.
Manifests with identical layouts (e.g. a config and its `_wosoft` variant) share one
round trip.
"""

import functools
import json
import os
import shutil

import numpy as np
import pytest

from ait_jax import convert
from ait_jax.checkpoint import mapping, pretrained, torch_files
from ait_jax.checkpoint.ait import ait_from_reference_config
from ait_jax.checkpoint.vqvae import vqvae_entries, vqvae_from_reference_kwargs
from ait_jax.train import trainer
from tests.fixture_io import REPO, fixtures_dir
from tests.test_convert import module_tree

_DONE: set = set()  # layouts already round-tripped


def _manifests() -> list:
  return sorted(fixtures_dir().glob("manifest_*.json"))


@functools.cache
def _largest():
  return max(_manifests(), key=lambda p: json.loads(p.read_text())["state_dict_numel"])


def _target(manifest: dict) -> tuple[pretrained.Target, str]:
  if "model_cfg" in manifest:
    return pretrained.ait_target(ait_from_reference_config(manifest["model_cfg"])), "ait"
  entries = vqvae_entries(vqvae_from_reference_kwargs(manifest["kwargs"], "ait"))
  return pretrained.Target(entries, {"tokenizer": entries}), "tokenizer"


@pytest.fixture
def scratch(tmp_path):
  """A directory in memory when the machine has one (the files are up to 1 GB)."""
  shm = "/dev/shm"
  if os.path.isdir(shm) and os.access(shm, os.W_OK):
    path = os.path.join(shm, f"ait_jax_test_{os.getpid()}")
    os.makedirs(path, exist_ok=True)
    yield path
    for name in os.listdir(path):
      os.remove(os.path.join(path, name))
    os.rmdir(path)
  else:
    yield str(tmp_path)


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: p.stem)
def test_full_size_weights_round_trip_through_files(path, scratch):
  manifest = json.loads(path.read_text())
  layout = {k: (tuple(v["shape"]), v["dtype"]) for k, v in manifest["state_dict"].items()}
  target, role = _target(manifest)
  assert {e.torch_key: (e.torch_shape if isinstance(e, mapping.Param) else e.value.shape)
          for e in target.entries} == {k: s for k, (s, _) in layout.items()}
  signature = tuple(sorted(layout.items()))
  if signature in _DONE:
    return
  zeros = {e.flax_path: np.zeros(e.flax_shape, np.float32) for e in target.entries
           if isinstance(e, mapping.Param)}
  sd = mapping.to_torch(mapping.unflatten(zeros), target.entries)
  if torch_files.torch_available():
    import torch  # pylint: disable=g-import-not-at-top
    # `assign` puts the tensors into the shape-only (meta) module; keys and shapes are
    # checked first.
    module_tree(layout, torch, device="meta").load_state_dict(
        {k: torch.from_numpy(v) for k, v in sd.items()}, strict=True, assign=True)
  # Through the files: safetensors always, a torch file for the largest model.
  stem = os.path.join(scratch, path.stem)
  if path == _largest():
    written = torch_files.write_state_dict(stem, sd)
  else:
    written = [stem + ".safetensors"]
    torch_files.write_safetensors(written[0], sd)
  del sd
  file = torch_files.read_state_dict(written[0])
  assert {k: (v.shape, str(v.dtype)) for k, v in file.state_dict.items()} == layout
  part = pretrained.import_part(file, role, target)
  assert part.complete and part.loaded.keys() == zeros.keys(), part.problems()
  assert all(v.dtype == np.float32 and v.shape == zeros[p].shape and not np.any(v)
             for p, v in part.loaded.items())
  del file, part
  if len(written) > 1:
    import torch  # pylint: disable=g-import-not-at-top
    loaded = torch.load(written[1], weights_only=True, mmap=True)
    assert {k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in loaded.items()} == layout
    module_tree(layout, torch, device="meta").load_state_dict(loaded, strict=True,
                                                              assign=True)
    del loaded
  for file_path in written:
    os.remove(file_path)
  _DONE.add(signature)



def _config_files() -> list:
  """The configs in configs/ that have a manifest of the same name."""
  return sorted(p for p in (REPO / "configs").glob("*.py")
                if (fixtures_dir() / f"manifest_{p.stem}.json").exists())


@pytest.mark.slow
@pytest.mark.parametrize("config_path", _config_files(), ids=lambda p: p.stem)
def test_full_size_config_through_a_workdir(config_path, scratch):
  """A full-size reference file -> the trainer's checkpoint -> the same file layout."""
  cfg = trainer.load_config_file(str(config_path))
  manifest = json.loads((fixtures_dir() / f"manifest_{config_path.stem}.json").read_text())
  layout = {k: (tuple(v["shape"]), v["dtype"]) for k, v in manifest["state_dict"].items()}
  target = convert.target_of(cfg)
  zeros = {e.flax_path: np.zeros(e.flax_shape, np.float32) for e in target.entries
           if isinstance(e, mapping.Param)}
  src = os.path.join(scratch, "in.safetensors")
  torch_files.write_safetensors(src, mapping.to_torch(mapping.unflatten(zeros),
                                                      target.entries))
  workdir = os.path.join(scratch, "workdir")
  try:
    convert.from_torch(cfg, [src], workdir)
  except ValueError as e:
    if "has no trainer yet" in str(e):
      pytest.skip(str(e))
    raise
  written = convert.to_torch(cfg, workdir, os.path.join(scratch, "out"))
  for path in written:
    sd = torch_files.read_state_dict(path).state_dict
    assert {k: (v.shape, str(v.dtype)) for k, v in sd.items()} == layout
    assert not any(np.any(sd[k]) for k in sd if k not in {
        e.torch_key for e in target.entries if isinstance(e, mapping.Buffer)})
  shutil.rmtree(workdir)
