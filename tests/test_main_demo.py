"""The demos end to end (slow: minutes each on 2 CPU cores).

`python -m ait_jax.main --config configs/demo_<task>.py --workdir DIR` generates the
synthetic dataset, trains the demo tokenizers, then AiT, and writes checkpoints, metrics
and an evaluation. Each test checks that the evaluation shows learning against a fixed
bar. Run with -s to see how long each took; times are reported, not asserted.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from ait_jax.evaluation import coco
from ait_jax.train import testing


def _main(workdir: str, config: str, *flags) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=testing.REPO)
  start = time.time()
  proc = subprocess.run(
      [sys.executable, "-m", "ait_jax.main", "--config", config, "--workdir", workdir,
       *flags], cwd=testing.REPO, env=env, capture_output=True, text=True, timeout=1800)
  print(f"{config} {' '.join(flags)} took {time.time() - start:.0f} s")
  assert proc.returncode == 0, proc.stderr[-6000:]
  return proc


def _last_eval(workdir: str) -> dict:
  evals = sorted(os.listdir(os.path.join(workdir, "eval")))
  with open(os.path.join(workdir, "eval", evals[-1])) as f:
    return json.load(f)


@pytest.mark.slow
def test_demo_depth(tmp_path):
  workdir = str(tmp_path / "demo")
  _main(workdir, "configs/demo_depth.py")  # about 4 minutes on an idle 2-core machine
  for name in ("config.json", "metrics.jsonl", "checkpoints", "tensorboard",
               "tokenizer_depth/checkpoints"):
    assert os.path.exists(os.path.join(workdir, name)), name
  losses = [m["loss"] for m in testing.read_metrics(workdir)]
  assert sum(losses[-3:]) / 3 < 0.5 * losses[0]
  metrics = _last_eval(workdir)
  assert metrics["depth/rmse"] < metrics["depth/baseline_rmse"], metrics


@pytest.mark.slow
def test_demo_insseg(tmp_path):
  """Both stages train and are evaluated; then the model predicts on image files.

  The tokenizer's reconstructions in the ground-truth boxes reach a high mask AP. AiT
  learns its sequences (the loss falls), is scored on every COCO summary number and
  finds the held-out shapes: runs of 3000-5000 steps reached a mask AP50 of 0.10 to
  0.51 (configs/demo_insseg.py); with the model not finding them it is near 0.
  """
  workdir = str(tmp_path / "demo")
  _main(workdir, "configs/demo_insseg.py")
  tokenizer = _last_eval(os.path.join(workdir, "tokenizer_insseg"))
  assert tokenizer["insseg/mask_iou"] > 0.85, tokenizer
  assert tokenizer["insseg/segm_AP"] > 0.7, tokenizer
  losses = [m["loss"] for m in testing.read_metrics(workdir)]
  assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses
  metrics = _last_eval(workdir)
  print({k: round(v, 3) for k, v in metrics.items() if k.endswith(("AP", "AP50"))})
  assert metrics["insseg/bbox_AP50"] > 0.05 and metrics["insseg/segm_AP50"] > 0.05, metrics
  names = [f"insseg/{t}_{n}" for t in ("bbox", "segm") for n in coco.SUMMARY_NAMES]
  assert all(-1 <= metrics[k] <= 1 for k in names), metrics

  images = tmp_path / "images"
  images.mkdir()
  val = os.path.join(workdir, "data", "synthetic", "coco", "val2017")
  for name in sorted(os.listdir(val))[:2]:
    shutil.copy(os.path.join(val, name), images / name)
  out = tmp_path / "predicted"
  _main(workdir, "configs/demo_insseg.py", "--mode=predict", f"--input={images}",
        f"--output={out}")
  for name in sorted(os.listdir(images)):
    stem = os.path.splitext(name)[0]
    picture = np.asarray(Image.open(out / f"{stem}_instances.png"))
    assert picture.shape == np.asarray(Image.open(images / name)).shape
    with open(out / f"{stem}_instances.json") as f:
      results = json.load(f)
    assert len(results) == 10  # num_query objects, whatever their score
    assert all({"bbox", "segmentation", "score", "category_id"} <= set(r)
               for r in results)


@pytest.mark.slow
def test_demo_joint(tmp_path):
  """One model trained on both tasks is evaluated on both."""
  workdir = str(tmp_path / "demo")
  _main(workdir, "configs/demo_joint.py")
  for name in ("tokenizer_depth/checkpoints", "tokenizer_insseg/checkpoints"):
    assert os.path.exists(os.path.join(workdir, name)), name
  last = testing.read_metrics(workdir)[-1]
  assert np.isfinite(last["depth_loss"]) and np.isfinite(last["insseg_loss"]), last
  metrics = _last_eval(workdir)
  assert metrics["depth/rmse"] < metrics["depth/baseline_rmse"], metrics
  assert 0 <= metrics["insseg/segm_AP"] <= 1 and 0 <= metrics["insseg/bbox_AP"] <= 1
