"""The README's demo end to end (slow: several minutes on 2 CPU cores).

`python -m ait_jax.main --config configs/demo_depth.py --workdir DIR` generates the
synthetic dataset, trains the demo tokenizer, then AiT, writes checkpoints, metrics
and an evaluation whose RMSE beats predicting the training-set mean depth. Run with -s
to see how long it took.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from ait_jax.train import testing


@pytest.mark.slow
def test_demo_depth(tmp_path):
  workdir = str(tmp_path / "demo")
  env = dict(os.environ, PYTHONPATH=testing.REPO)
  start = time.time()
  proc = subprocess.run(
      [sys.executable, "-m", "ait_jax.main", "--config", "configs/demo_depth.py",
       "--workdir", workdir], cwd=testing.REPO, env=env, capture_output=True, text=True,
      timeout=1800)
  # Its time is reported, not asserted (about 4 minutes on an idle 2-core machine).
  print(f"the demo took {time.time() - start:.0f} s")
  assert proc.returncode == 0, proc.stderr[-6000:]
  for name in ("config.json", "metrics.jsonl", "checkpoints", "tensorboard",
               "tokenizer_depth/checkpoints"):
    assert os.path.exists(os.path.join(workdir, name)), name
  losses = [m["loss"] for m in testing.read_metrics(workdir)]
  assert sum(losses[-3:]) / 3 < 0.5 * losses[0]
  evals = sorted(os.listdir(os.path.join(workdir, "eval")))
  with open(os.path.join(workdir, "eval", evals[-1])) as f:
    metrics = json.load(f)
  assert metrics["depth/rmse"] < metrics["depth/baseline_rmse"], metrics
