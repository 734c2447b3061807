"""Conversion between ait-jax workdirs (orbax) and reference PyTorch files.

Bit-exact round trips on the demo configs and the reference fixtures' weights, backbone
import at another window size, and the errors that list every problem of the inputs.
Tests that need torch import it with `pytest.importorskip`.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ait_jax import convert
from ait_jax.checkpoint import mapping, pretrained, torch_files
from ait_jax.checkpoint.ait import ait_from_reference_config
from ait_jax.checkpoint.swin_v2 import swin_v2_entries, swin_v2_from_reference_kwargs
from ait_jax.checkpoint.transformer import transformer_entries, transformer_from_reference_kwargs
from ait_jax.checkpoint.vqvae import vqvae_entries, vqvae_from_reference_kwargs
from ait_jax.models import swin_v2_tables
from ait_jax.parallel import mesh as mesh_lib
from ait_jax.train import trainer
from tests.fixture_io import REPO, Fixture, kind_fixtures
from tests.test_torch_files import write_torch_zip

DEMO, DEMO_TOKENIZER = "configs/demo_depth.py", "configs/demo_vqvae_depth.py"


def _config(path: str, model: dict | None = None, crop_size=None):
  cfg = trainer.load_config_file(path)
  with cfg.unlocked():
    if model is not None:
      cfg.model = model
    if crop_size is not None:
      cfg.tasks.depth.crop_size = tuple(crop_size)
  return cfg


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


def _assert_state_dicts_equal(got: dict, want: dict, entries):
  """Parameters bit for bit; derived buffers exactly, float tables within their atol."""
  assert sorted(got) == sorted(want)
  atol = {e.torch_key: e.atol for e in entries if isinstance(e, mapping.Buffer)}
  for k, v in want.items():
    assert got[k].shape == v.shape and got[k].dtype == v.dtype, k
    if atol.get(k):
      np.testing.assert_allclose(got[k], v, rtol=0, atol=atol[k], err_msg=k)
    else:
      np.testing.assert_array_equal(got[k], v, err_msg=k)


# --- demo configs: orbax -> PyTorch file -> orbax ------------------------------------

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """A stage-2 demo workdir (checkpoints of steps 3 and 7) with its stage-1 tokenizer."""
  root = str(tmp_path_factory.mktemp("demo"))
  cfg, tcfg = _config(DEMO), _config(DEMO_TOKENIZER)
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
  _assert_state_dicts_equal(torch_files.read_state_dict(again[0]).state_dict, sd,
                            target.entries)

  # The tokenizer alone: from the stage-2 workdir (--vqvae) or its own stage-1 workdir.
  alone = convert.to_torch(cfg, root, str(tmp_path / "vq"), vqvae="depth")
  alone_sd = torch_files.read_state_dict(alone[0]).state_dict
  _assert_state_dicts_equal(alone_sd, tok_sd, target.parts["depth"])
  assert "_vq_vae._embedding" in alone_sd and "encoder.0.weight" in alone_sd
  stage1 = convert.to_torch(tcfg, os.path.join(root, "tokenizer_depth"),
                            str(tmp_path / "stage1.pth"))
  _assert_state_dicts_equal(torch_files.read_state_dict(stage1[0]).state_dict, alone_sd,
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
       os.path.join(REPO, DEMO), "--workdir", back, "--in", f"ait={demo_export[0]}"],
      env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert f"{demo_export[0]} as ait: loaded" in run.stdout
  _assert_trees_equal(_restored(cfg, back), model)


# --- reference fixtures: PyTorch -> orbax -> PyTorch ---------------------------------

def _fixture_parts(fx: Fixture):
  """(entries, state_dict) of a fixture's module, or None for kinds without weights."""
  if fx.kind == "swin_v2":
    return swin_v2_entries(swin_v2_from_reference_kwargs(fx.config["kwargs"])), fx.state_dict
  if fx.kind in ("vqvae", "vqvae_train"):
    module = vqvae_from_reference_kwargs(fx.config["kwargs"],
                                         "ait" if fx.kind == "vqvae" else "train")
    return vqvae_entries(module), fx.state_dict
  if fx.kind == "ar_transformer":
    kwargs = {**fx.config["kwargs"], "parallel": True, "soft_transformer": False}
    sd = {**fx.state_dict, **fx.extra_state_dict("parallel_extra")}
    return transformer_entries(transformer_from_reference_kwargs(kwargs)), sd
  return None


def _torch_file_writers():
  writers = {"zip_without_torch": lambda p, sd: write_torch_zip(p, {"state_dict": sd})}
  if torch_files.torch_available():
    writers["torch.save"] = torch_files.write_torch
  return writers


@pytest.mark.parametrize("writer", sorted(_torch_file_writers()))
def test_fixture_weights_round_trip(writer, tmp_path):
  """Every fixture module's weights: PyTorch file -> orbax -> PyTorch file, unchanged."""
  write = _torch_file_writers()[writer]
  checked = 0
  for fx in kind_fixtures():
    parts = _fixture_parts(fx)
    if parts is None:
      continue
    entries, sd = parts
    src = str(tmp_path / f"{fx.name}.pth")
    write(src, sd)
    part = pretrained.import_part(torch_files.read_state_dict(src), "m",
                                  pretrained.Target(entries, {"m": entries}))
    assert part.complete and not part.ignored, part.problems()
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / f"{fx.name}_orbax", mapping.unflatten(part.loaded))
    ckpt.wait_until_finished()
    restored = jax.device_get(ckpt.restore(tmp_path / f"{fx.name}_orbax"))
    written = torch_files.write_state_dict(str(tmp_path / f"{fx.name}_out"),
                                           mapping.to_torch(restored, entries))
    for path in written:
      _assert_state_dicts_equal(torch_files.read_state_dict(path).state_dict, sd, entries)
    checked += 1
  assert checked >= 4


def _e2e_config(fx: Fixture):
  model = fx.config["model"]
  size = model["task_heads"]["depth"]["vae_cfg"]["mask_size"]
  return _config(DEMO, model=model, crop_size=(size, size))


def _e2e_fixture() -> Fixture:
  found = [fx for fx in kind_fixtures() if fx.kind == "ait_depth_e2e"]
  if not found:
    pytest.skip("no ait_depth_e2e fixture")
  return found[0]


def test_reference_ait_checkpoint_through_a_workdir(tmp_path):
  """A full AiT checkpoint (mmcv layout) -> workdir -> the same state_dict back, which
  (with torch) a torch module of the reference's keys loads strictly."""
  fx = _e2e_fixture()
  cfg = _e2e_config(fx)
  src = str(tmp_path / "ait.pth")
  write_torch_zip(src, {"meta": {"iter": 100}, "state_dict": {
      f"module.{k}": v for k, v in fx.state_dict.items()}})
  combined = convert.from_torch(cfg, [src], str(tmp_path / "wd"))
  assert not combined.not_loaded and combined.parts[0].role == "ait"
  with open(tmp_path / "wd" / convert.REPORT_FILE) as f:
    notes = json.load(f)["files"][0]["notes"]
  assert notes[0] == "took the state_dict from the 'state_dict' entry (not read: meta)"
  written = convert.to_torch(cfg, str(tmp_path / "wd"), str(tmp_path / "out"))
  entries = convert.target_of(cfg).entries
  for path in written:
    _assert_state_dicts_equal(torch_files.read_state_dict(path).state_dict, fx.state_dict,
                              entries)
  if not torch_files.torch_available():
    return
  import torch  # pylint: disable=g-import-not-at-top
  module = module_tree({k: (v.shape, v.dtype) for k, v in fx.state_dict.items()}, torch)
  module.load_state_dict(torch.load(written[1], weights_only=True), strict=True)
  for k, v in module.state_dict().items():
    np.testing.assert_allclose(v.numpy(), fx.state_dict[k], rtol=0,
                               atol=1e-6 if k.endswith("enc_embed") else 0, err_msg=k)


def module_tree(layout: dict, torch, device: str = "cpu"):
  """A plain torch module with a tensor of each (shape, dtype) at each dotted key."""
  root = torch.nn.Module()
  for key, (shape, dtype) in layout.items():
    *path, name = key.split(".")
    node = root
    for part in path:
      if not hasattr(node, part):
        node.add_module(part, torch.nn.Module())
      node = getattr(node, part)
    node.register_buffer(name, torch.empty(tuple(shape), device=device,
                                           dtype=getattr(torch, np.dtype(dtype).name)))
  return root


# --- backbones, partial loads, errors ------------------------------------------------

def _swin_fixture() -> Fixture:
  found = [fx for fx in kind_fixtures() if fx.kind == "swin_v2"]
  if not found:
    pytest.skip("no swin_v2 fixture")
  return found[0]


def _simmim_file(path, sd: dict) -> None:
  """A SimMIM pretraining checkpoint around a backbone state_dict (norm0-3 -> norm)."""
  encoder = {f"encoder.{k}": v for k, v in sd.items() if not k.startswith("norm")}
  last = max(int(k[4]) for k in sd if k.startswith("norm"))
  encoder["encoder.norm.weight"] = sd[f"norm{last}.weight"]
  encoder["encoder.norm.bias"] = sd[f"norm{last}.bias"]
  encoder["encoder.mask_token"] = np.zeros((1, 1, sd["patch_embed.proj.bias"].shape[0]),
                                           np.float32)
  encoder["decoder.0.weight"] = np.ones((48, 8, 1, 1), np.float32)
  write_torch_zip(path, {"model": encoder, "epoch": 800})


def _ait_with_backbone(backbone: dict) -> pretrained.Target:
  width = backbone["embed_dim"] * 2 ** (len(backbone["depths"]) - 1)
  ref = ait_from_reference_config(dict(
      type="AiT", backbone={**backbone, "out_indices": (len(backbone["depths"]) - 1,)},
      transformer=dict(type="ARTransformer", in_chans=width, d_model=16, nhead=2,
                       num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
                       num_vocal=40, num_bins=10, num_classes=3, num_embeddings=8,
                       num_embeddings_depth=8, dec_length=10, n_rows=2, n_cols=2)))
  return pretrained.ait_target(ref)


def test_simmim_backbone_at_other_window_sizes(tmp_path):
  fx = _swin_fixture()
  kwargs = fx.config["kwargs"]
  src = str(tmp_path / "simmim.pth")
  _simmim_file(src, fx.state_dict)
  file = torch_files.read_state_dict(src)
  windows = [2 * w - 1 for w in kwargs["window_size"]]  # other sizes than the file's
  target = _ait_with_backbone({**kwargs, "window_size": windows})
  assert pretrained.detect_role(file, target) == "backbone"
  part = pretrained.import_part(file, "backbone", target)

  # The position-bias MLP and every other weight transfer; only the tables change.
  n = len(kwargs["depths"]) - 1
  assert part.missing == [f"norm{n}.weight", f"norm{n}.bias"]
  assert sorted(part.unexpected) == ["mask_token", "norm.bias", "norm.weight"]
  assert not part.shape and not part.value
  ignored = dict(part.ignored)
  assert ignored["decoder.0.weight"] == "outside the backbone"
  assert ignored["layers.0.blocks.0.attn.relative_position_index"].startswith("derived")
  assert not any("WARNING" in note for note in part.notes), part.notes
  exported = mapping.to_torch({"params": _with_norm(part, n)},
                              swin_v2_entries(target.backbone))
  for k, v in fx.state_dict.items():
    if any(t in k for t in pretrained.DERIVED_TABLES):
      stage = int(k.split(".")[1])
      window, pretrain = windows[stage], kwargs["pretrain_window_size"][stage]
      want = (swin_v2_tables.relative_coords_table(window, pretrain) if "coords" in k
              else swin_v2_tables.relative_position_index(window))
      np.testing.assert_array_equal(exported[k], want, err_msg=k)
      assert exported[k].shape != v.shape
    elif not k.startswith("norm"):
      np.testing.assert_array_equal(exported[k], v, err_msg=k)

  # A config that scales offsets differently from pretraining is warned about.
  wrong = [2 * p for p in kwargs["pretrain_window_size"]]
  part = pretrained.import_part(file, "backbone", _ait_with_backbone(
      {**kwargs, "window_size": windows, "pretrain_window_size": wrong}))
  warnings = [note for note in part.notes if note.startswith("WARNING")]
  assert len(warnings) == len(wrong)
  assert f"pretrain window of {kwargs['pretrain_window_size'][0]}," in warnings[0]


def _with_norm(part, n):
  """The imported backbone parameters plus the `norm{n}` a SimMIM file does not have."""
  params = mapping.unflatten(part.loaded)["model"]["params"]["backbone"]
  dim = params["patch_embed"]["norm"]["scale"].shape[0] * 2 ** n
  return {**params, f"norm{n}": {"scale": np.ones(dim, np.float32),
                                 "bias": np.zeros(dim, np.float32)}}


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


def test_mismatched_file_gets_one_error_listing_everything(tmp_path):
  fx = _e2e_fixture()
  cfg = _e2e_config(fx)
  sd = dict(fx.state_dict)
  del sd["transformer.proj.bias"]
  sd["transformer.extra.weight"] = np.zeros(3, np.float32)
  sd["backbone.norm3.weight"] = np.zeros(5, np.float32)
  src = str(tmp_path / "bad.safetensors")
  torch_files.write_safetensors(src, sd)
  with pytest.raises(pretrained.IncompleteImport) as err:
    convert.from_torch(cfg, [src], str(tmp_path / "wd"))
  msg = str(err.value)
  assert "missing keys (1): transformer.proj.bias" in msg
  assert "unexpected keys (1): transformer.extra.weight" in msg
  assert "shape mismatch: backbone.norm3.weight has (5,)" in msg
  # With the flag, what fits is loaded and the rest listed (checked without writing).
  target = convert.target_of(cfg)
  part = pretrained.import_part(torch_files.read_state_dict(src), "ait", target)
  combined = pretrained.combine([part], target)
  pretrained.check(combined, allow_partial=True, what="it")
  # transformer.proj.bias still came from the head's copy of the transformer.
  assert part.missing == ["transformer.proj.bias"]
  assert combined.not_loaded == ["backbone.norm3.weight"]


def test_conflicts_and_disagreeing_values_fail_even_when_partial(tmp_path):
  fx = _e2e_fixture()
  target = convert.target_of(_e2e_config(fx))
  src = str(tmp_path / "ait.safetensors")
  torch_files.write_safetensors(src, fx.state_dict)
  file = torch_files.read_state_dict(src)
  both = pretrained.combine([pretrained.import_part(file, r, target)
                             for r in ("ait", "backbone")], target)
  with pytest.raises(pretrained.IncompleteImport, match="patch_embed.proj.weight is given "
                     "by both"):
    pretrained.check(both, allow_partial=True, what="it")
  sd = dict(fx.state_dict)
  sd["depth_head.transformer.outp_bias"] = sd["depth_head.transformer.outp_bias"] + 1
  file = torch_files.StateDictFile("edited", sd, [])
  part = pretrained.import_part(file, "ait", target)
  with pytest.raises(pretrained.IncompleteImport, match="value mismatch: depth_head."
                     "transformer.outp_bias: differs from transformer.outp_bias"):
    pretrained.check(pretrained.combine([part], target), allow_partial=True, what="it")


def test_vqvae_file_forms_and_roles(tmp_path):
  found = [fx for fx in kind_fixtures() if fx.kind == "vqvae"]
  if not found:
    pytest.skip("no vqvae fixture")
  fx = found[0]
  entries = vqvae_entries(vqvae_from_reference_kwargs(fx.config["kwargs"], "ait"))
  # The training script's layout: DDP keys under 'weights', and a stray codebook.
  src = str(tmp_path / "vqvae.pt")
  write_torch_zip(src, {"weights": {**{f"module.{k}": v for k, v in fx.state_dict.items()},
                                    "module.codebook.weight": np.zeros((2, 2), np.float32)}})
  file = torch_files.read_state_dict(src)
  other = vqvae_entries(vqvae_from_reference_kwargs(
      {**fx.config["kwargs"], "num_embeddings": 2 * fx.config["kwargs"]["num_embeddings"]},
      "ait"))
  target = pretrained.Target(entries + other, {"depth": entries, "insseg": other})
  assert pretrained.detect_role(file, target) == "depth"  # the one it fits
  part = pretrained.import_part(file, "depth", target)
  assert part.complete and [k for k, _ in part.ignored] == ["codebook.weight"]
  with pytest.raises(ValueError, match="fits none of this config's tokenizers"):
    pretrained.detect_role(file, pretrained.Target(other + other,
                                                   {"depth": other, "insseg": other}))
