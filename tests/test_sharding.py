"""Sharded training on 8 simulated CPU devices (one subprocess per device count).

The losses of a tiny config after a few steps are the same for the meshes
data x fsdp x tensor = 8x1x1, 2x4x1, 2x2x2 and for one device; under FSDP every device
holds 1/fsdp of each sharded parameter (and of its Adam moments); a checkpoint written
on 8 devices (2x4x1) restores on one device and continues with the one-device losses.
"""

import json
import math
import os
import shutil
import sys

import pytest

from ait_jax.train import testing

STEPS = 3
MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2))


def _config(workspace, workdir, mesh, total_steps):
  from ait_jax.train import trainer  # pylint: disable=g-import-not-at-top
  cfg = trainer.load_config_file(testing.TINY_CONFIG)
  with cfg.unlocked():
    cfg.update_from_flattened_dict({
        "data.synthetic_dir": workspace["data"],
        "tokenizers.depth.checkpoint": workspace["tokenizer"],
        "progress_bar": False, "eval_at_end": False, "total_steps": total_steps,
        "checkpoint.every_steps": STEPS, "checkpoint.async_save": False,
        "mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]})
  return cfg


def _shard_report(state, mesh) -> dict:
  """Per mesh axis: how many parameter leaves it shards, and whether every device's
  shard of each is the full size divided by that axis."""
  import jax  # pylint: disable=g-import-not-at-top
  report = {"fsdp_leaves": 0, "tensor_leaves": 0, "bad": []}
  trees = {"params": state.params, "opt_state": state.opt_state}
  for tree_name, tree in trees.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      spec = tuple(leaf.sharding.spec) + (None,) * leaf.ndim
      for dim in range(leaf.ndim):
        names = spec[dim] if isinstance(spec[dim], tuple) else (spec[dim],)
        split = math.prod(mesh.shape[n] for n in names if n)
        if tree_name == "params":
          report["fsdp_leaves"] += "fsdp" in names and mesh.shape["fsdp"] > 1
          report["tensor_leaves"] += "tensor" in names and mesh.shape["tensor"] > 1
        for shard in leaf.addressable_shards:
          if shard.data.shape[dim] * split != leaf.shape[dim]:
            report["bad"].append(f"{jax.tree_util.keystr(path)} dim {dim}")
  return report


def worker(root: str, devices: int) -> None:
  """Runs in a subprocess with `devices` simulated devices; prints a JSON report."""
  from ait_jax.train import trainer  # pylint: disable=g-import-not-at-top
  workspace = json.loads(open(os.path.join(root, "workspace.json")).read())
  out = {}
  if devices == 8:
    for mesh in MESHES:
      workdir = os.path.join(root, "mesh_" + "x".join(map(str, mesh)))
      run = trainer.Run(_config(workspace, workdir, mesh, STEPS), workdir)
      state = run.train()
      out["x".join(map(str, mesh))] = {
          "losses": [m["loss"] for m in testing.read_metrics(workdir)],
          "shards": _shard_report(state, run.mesh)}
      run.close()
  else:
    workdir = os.path.join(root, "one_device")
    run = trainer.Run(_config(workspace, workdir, (1, 1, 1), STEPS + 2), workdir)
    run.train()
    run.close()
    out["1"] = {"losses": [m["loss"] for m in testing.read_metrics(workdir)]}
    # Continue the 8-device (2x4x1) run on this single device.
    moved = os.path.join(root, "moved")
    shutil.copytree(os.path.join(root, "mesh_2x4x1"), moved)
    run = trainer.Run(_config(workspace, moved, (1, 1, 1), STEPS + 2), moved)
    run.train()
    run.close()
    out["moved"] = {"losses": [m["loss"] for m in testing.read_metrics(moved)]}
  print("REPORT " + json.dumps(out))


def _run_worker(root, workspace, devices):
  import subprocess  # pylint: disable=g-import-not-at-top
  proc = subprocess.run(
      [sys.executable, "-m", "tests.test_sharding", root, str(devices)], cwd=testing.REPO,
      env=testing.subprocess_env(workspace, devices), capture_output=True, text=True,
      timeout=420)
  assert proc.returncode == 0, proc.stderr[-6000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("REPORT ")][-1]
  return json.loads(line[len("REPORT "):])


def _close(a, b, tol=1e-5):
  return all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b)) and len(a) == len(b)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("sharding"))
  workspace = testing.make_workspace(root)
  with open(os.path.join(root, "workspace.json"), "w") as f:
    json.dump(workspace, f)
  return {**_run_worker(root, workspace, 8), **_run_worker(root, workspace, 1)}


def test_same_losses_on_every_mesh(reports):
  one = reports["1"]["losses"][:STEPS]
  assert len(one) == STEPS and all(math.isfinite(x) for x in one)
  for mesh in MESHES:
    got = reports["x".join(map(str, mesh))]["losses"]
    assert _close(got, one), f"mesh {mesh}: {got} vs one device {one}"


def test_fsdp_and_tensor_shards(reports):
  for mesh in MESHES:
    shards = reports["x".join(map(str, mesh))]["shards"]
    assert not shards["bad"], f"mesh {mesh}: wrong shard shapes {shards['bad'][:5]}"
  assert reports["2x4x1"]["shards"]["fsdp_leaves"] > 20
  assert reports["2x2x2"]["shards"]["fsdp_leaves"] > 20
  assert reports["2x2x2"]["shards"]["tensor_leaves"] > 10
  assert reports["8x1x1"]["shards"]["fsdp_leaves"] == 0


def test_restore_on_another_device_count(reports):
  moved = reports["moved"]["losses"]
  one = reports["1"]["losses"]
  assert len(moved) == STEPS + 2
  assert _close(moved, one), f"8 devices then 1: {moved} vs 1 device: {one}"


if __name__ == "__main__":
  worker(sys.argv[1], int(sys.argv[2]))
