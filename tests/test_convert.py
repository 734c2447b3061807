"""Conversion between ait-jax workdirs (orbax) and reference PyTorch files.

Bit-exact round trips of the demo configs' workdirs and partial loads. The checks on the
reference fixtures' weights and layouts are in tests/test_reference_parity.py.
Tests that need torch import it with `pytest.importorskip`.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from ait_jax import convert
from ait_jax.checkpoint import mapping, pretrained, torch_files
from ait_jax.parallel import mesh as mesh_lib
from ait_jax.train import trainer
from tests import convert_utils
from tests.fixture_io import REPO


def _random_workdir(cfg, workdir: str, step: int, seed: int) -> dict:
  """A workdir as the trainer leaves it, every variable random; {'params', ...extra}."""
  wd = convert.Workdir(cfg, workdir)
  rng = np.random.default_rng(seed)
  abstract = {"params": wd.factory.abstract.params, **wd.factory.abstract.extra}
  tree = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), abstract)
  params = tree.pop("params")
  wd.save(step, params, tree)
  trainer.write_config(cfg, workdir)
  return {"params": params, **tree}


def _restored(cfg, workdir: str, step=None) -> dict:
  """The variables of a checkpoint; the latest one as the trainer itself restores it."""
  if step is None:
    state = trainer.restore_workdir_state(workdir, mesh_lib.make_mesh((-1, 1, 1)))
  else:
    state, _ = convert.Workdir(cfg, workdir).restore(step)
  return {"params": jax.device_get(state.params), **jax.device_get(state.extra)}


def _assert_trees_equal(got, want):
  got, want = mapping.flatten(got), mapping.flatten(want)
  assert got.keys() == want.keys()
  for k in want:
    assert np.asarray(got[k]).dtype == np.asarray(want[k]).dtype, k
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]),
                                  err_msg="/".join(k))


# --- demo configs: orbax -> PyTorch file -> orbax ------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """A stage-2 demo workdir (checkpoints of steps 3 and 7) with its stage-1 tokenizer."""
  root = str(tmp_path_factory.mktemp("demo"))
  cfg = convert_utils.load_config(convert_utils.DEMO)
  tcfg = convert_utils.load_config(convert_utils.DEMO_TOKENIZER)
  tokenizer = _random_workdir(tcfg, os.path.join(root, "tokenizer_depth"), 5, seed=1)
  _random_workdir(cfg, root, 3, seed=2)
  model = _random_workdir(cfg, root, 7, seed=3)
  return cfg, tcfg, root, model, tokenizer


@pytest.fixture(scope="module")
def demo_export(demo, tmp_path_factory):
  """The demo workdir's step 7 as reference files: (safetensors, torch file or None)."""
  cfg, _, root, _, _ = demo
  written = convert.to_torch(cfg, root, str(tmp_path_factory.mktemp("export") / "ait"),
                             step=7)
  return written[0], (written[1] if len(written) > 1 else None)


def test_demo_round_trip_is_bit_exact(demo, demo_export, tmp_path):
  cfg, tcfg, root, model, tokenizer = demo
  target = convert.target_of(cfg)
  sd = torch_files.read_state_dict(demo_export[0]).state_dict
  assert sorted(sd) == sorted(e.torch_key for e in target.entries)
  assert {k.split(".")[0] for k in sd} == {"backbone", "transformer", "depth_head"}

  back = str(tmp_path / "back")
  convert.from_torch(cfg, [demo_export[-1] or demo_export[0]], back)
  _assert_trees_equal(_restored(cfg, back), model)
  # The tokenizer came along, written where the trainer reads reference files.
  tok_file = convert.tokenizer_file(back, "depth")
  tok_sd = torch_files.read_state_dict(tok_file).state_dict
  with open(os.path.join(back, "config.json")) as f:
    assert json.load(f)["tokenizers"]["depth"]["checkpoint"] == tok_file
  again = convert.to_torch(cfg, back, str(tmp_path / "again"))
  convert_utils.assert_state_dicts_equal(torch_files.read_state_dict(again[0]).state_dict, sd,
                            target.entries)

  # The tokenizer alone: from the stage-2 workdir (--vqvae) or its own stage-1 workdir.
  alone = convert.to_torch(cfg, root, str(tmp_path / "vq"), vqvae="depth")
  alone_sd = torch_files.read_state_dict(alone[0]).state_dict
  convert_utils.assert_state_dicts_equal(alone_sd, tok_sd, target.parts["depth"])
  assert "_vq_vae._embedding" in alone_sd and "encoder.0.weight" in alone_sd
  stage1 = convert.to_torch(tcfg, os.path.join(root, "tokenizer_depth"),
                            str(tmp_path / "stage1.pth"))
  convert_utils.assert_state_dicts_equal(torch_files.read_state_dict(stage1[0]).state_dict, alone_sd,
                            target.parts["depth"])
  convert.from_torch(tcfg, [stage1[-1]], str(tmp_path / "tok_back"))
  _assert_trees_equal(_restored(tcfg, str(tmp_path / "tok_back")), tokenizer)


def test_workdir_errors_name_the_problem(demo, demo_export, tmp_path):
  cfg, _, root, _, _ = demo
  with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 4 \(it has \[3, 7\]"):
    convert.to_torch(cfg, root, str(tmp_path / "x"), step=4)
  with pytest.raises(FileExistsError, match="convert into a new workdir"):
    convert.from_torch(cfg, [demo_export[0]], root)
  # A workdir whose tokenizer is nowhere: an error, or with the flag, a file without it.
  lonely = str(tmp_path / "lonely")
  shutil.copytree(os.path.join(root, trainer.CHECKPOINT_DIR),
                  os.path.join(lonely, trainer.CHECKPOINT_DIR))
  with pytest.raises(mapping.StateDictMismatch, match=r"depth_head\.vqvae\.encoder\.0"):
    convert.to_torch(cfg, lonely, str(tmp_path / "x"))
  written = convert.to_torch(cfg, lonely, str(tmp_path / "x"), allow_partial=True)
  sd = torch_files.read_state_dict(written[0]).state_dict
  assert "transformer.voc_embed" in sd and not any(".vqvae." in k for k in sd)


def test_command_line(demo, demo_export, tmp_path):
  cfg, _, _, model, _ = demo
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  back = str(tmp_path / "cli_back")
  run = subprocess.run(
      [sys.executable, "-m", "ait_jax.convert", "from-torch", "--config",
       os.path.join(REPO, convert_utils.DEMO), "--workdir", back, "--in", f"ait={demo_export[0]}"],
      env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert f"{demo_export[0]} as ait: loaded" in run.stdout
  _assert_trees_equal(_restored(cfg, back), model)


# --- backbones, partial loads, errors ------------------------------------------------


def test_partial_load_needs_the_flag_and_lists_what_was_not_loaded(demo, demo_export,
                                                                   tmp_path):
  cfg = demo[0]
  src = demo_export[0]
  sd = torch_files.read_state_dict(src).state_dict
  # The backbone and the tokenizer of an AiT checkpoint, without its transformer.
  inputs = [f"backbone={src}", f"depth={src}"]
  with pytest.raises(pretrained.IncompleteImport) as err:
    convert.from_torch(cfg, inputs, str(tmp_path / "strict"))
  assert "parameters not loaded" in str(err.value)
  assert "transformer.voc_embed" in str(err.value) and "--allow_partial" in str(err.value)
  assert not os.path.exists(tmp_path / "strict")

  combined = convert.from_torch(cfg, inputs, str(tmp_path / "wd"), allow_partial=True)
  transformer_keys = [e.torch_key for e in convert.target_of(cfg).entries
                      if isinstance(e, mapping.Param) and e.torch_key.startswith(
                          "transformer.")]
  assert combined.not_loaded == transformer_keys
  with open(tmp_path / "wd" / convert.REPORT_FILE) as f:
    report = json.load(f)
  assert report["not_loaded"] == transformer_keys
  assert any(i.startswith("transformer.") and i.endswith("outside the backbone")
             for i in report["files"][0]["ignored"])
  assert report["files"][1]["ignored"][0].endswith("outside the depth tokenizer")
  written = convert.to_torch(cfg, str(tmp_path / "wd"), str(tmp_path / "out"))
  back = torch_files.read_state_dict(written[0]).state_dict
  for k, v in sd.items():
    if k.startswith(("backbone.", "depth_head.vqvae.")):
      np.testing.assert_array_equal(back[k], v, err_msg=k)
    elif k == "transformer.voc_embed":  # a fresh initialisation
      assert not np.array_equal(back[k], v) and np.all(np.isfinite(back[k]))
