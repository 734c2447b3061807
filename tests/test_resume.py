"""Preemption and resumption through `python -m ait_jax.main` (subprocesses).

A run killed with SIGKILL between two checkpoints and started again ends with exactly
the parameters and losses of an uninterrupted run (the checkpoint holds the loader
states, so the resumed run reads exactly the next batches); a run sent SIGTERM saves a
checkpoint of the step it reached and exits cleanly.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ait_jax.train import testing

STEPS = 6


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  return testing.make_workspace(str(tmp_path_factory.mktemp("resume")))


def _flags(workspace, **overrides):
  return testing.tiny_flags(workspace, **{"total_steps": STEPS,
                                          "checkpoint.every_steps": 2, **overrides})


def _start(workdir, flags, env):
  return subprocess.Popen(
      [sys.executable, "-m", "ait_jax.main", f"--workdir={workdir}", *flags],
      cwd=testing.REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      text=True)


def _wait_for_step(proc, workdir, step, timeout=240):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(path) and any(m["step"] >= step
                                    for m in testing.read_metrics(workdir)):
      return
    if proc.poll() is not None:
      raise AssertionError(f"the run ended before step {step}:\n{proc.stderr.read()}")
    time.sleep(0.05)
  proc.kill()
  raise AssertionError(f"step {step} not reached in {timeout} s")


def _final_params(workdir):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "checkpoints")
  step = max(int(p) for p in os.listdir(path) if p.isdigit())
  tree = ocp.StandardCheckpointer().restore(os.path.join(path, str(step), "state"))
  return step, tree["params"]


def _flat(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}/{k}"))
    return out
  return {prefix: np.asarray(tree)}


@pytest.fixture(scope="module")
def straight(workspace, tmp_path_factory):
  """An uninterrupted run's workdir."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  testing.run_main(workdir, _flags(workspace), testing.subprocess_env(workspace))
  return workdir


def test_sigkill_then_resume_equals_uninterrupted(workspace, straight, tmp_path):
  env = testing.subprocess_env(workspace)
  resumed = str(tmp_path / "resumed")
  proc = _start(resumed, _flags(workspace), env)
  _wait_for_step(proc, resumed, 3)  # past the checkpoint of step 2, before step 4's
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  testing.run_main(resumed, _flags(workspace), env)

  want = [(m["step"], m["loss"]) for m in testing.read_metrics(straight)]
  got = [(m["step"], m["loss"]) for m in testing.read_metrics(resumed)]
  assert want == got and len(want) == STEPS
  step_a, params_a = _final_params(straight)
  step_b, params_b = _final_params(resumed)
  assert step_a == step_b == STEPS
  flat_a, flat_b = _flat(params_a), _flat(params_b)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=k)


def test_sigterm_saves_the_current_step(workspace, tmp_path):
  env = testing.subprocess_env(workspace)
  workdir = str(tmp_path / "preempted")
  flags = _flags(workspace, total_steps=10_000, **{"checkpoint.every_steps": 10_000})
  proc = _start(workdir, flags, env)
  _wait_for_step(proc, workdir, 3)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-4000:]
  last = testing.read_metrics(workdir)[-1]["step"]
  saved = sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints"))
                 if p.isdigit())
  assert saved == [last] and 3 <= last < 10_000
  assert "stopped by SIGTERM" in err


def test_workdir_layout_eval_and_predict(workspace, straight):
  """The fixed places of a workdir, and --mode eval / predict on a finished run."""
  for name in ("config.json", "metrics.jsonl", "checkpoints", "tensorboard"):
    assert os.path.exists(os.path.join(straight, name)), name
  flags = _flags(workspace, **{"tasks.depth.eval_batch_size": 2})
  env = testing.subprocess_env(workspace)
  testing.run_main(straight, flags + ["--mode=eval"], env)
  with open(os.path.join(straight, "eval", f"step_{STEPS:08d}.json")) as f:
    metrics = json.load(f)
  assert metrics["step"] == STEPS and 0 < metrics["depth/rmse"] < 20
  testing.run_main(straight, flags + ["--mode=predict"], env)
  written = sorted(os.listdir(os.path.join(straight, "predictions", "depth")))
  assert len(written) == 4  # the synthetic test split
  from PIL import Image  # pylint: disable=g-import-not-at-top
  png = np.asarray(Image.open(os.path.join(straight, "predictions", "depth", written[0])))
  assert png.dtype == np.uint16 and png.shape == (96, 128) and png.min() >= 1
