"""Parity with the reference PyTorch implementation, driven by the fixture directory.

Every `*_config.json` in `AIT_FIXTURES` (default ../shared/fixtures) is one test,
dispatched on its `fixture_kind`; the module is built from the fixture's own config and
loaded with its stored weights through the weight mapping, and every stored output is
compared. Run with `-s` to see the largest difference of each array.
"""

import jax
import numpy as np
import pytest

from ait_jax.evaluation import depth_metrics
from ait_jax.tasks import depth as depth_task
from tests.fixture_io import Fixture, assert_close, kind_fixtures

jax.config.update("jax_default_matmul_precision", "highest")

METRIC_RTOL = 1e-5


def check_depth_metrics(fx: Fixture):
  io = fx.io
  acc = depth_metrics.DepthMetricsAccumulator()
  for i in range(fx.config["n_samples"]):
    s = f"s{i}"
    pred, gt = io[f"{s}.pred"], io[f"{s}.gt"]
    assert depth_metrics.eval_pixels(pred, gt)[0].size == io[f"{s}.n_valid_after_crop"]
    got = acc.add(pred, gt)
    for k in depth_metrics.METRIC_NAMES:
      assert_close(f"{s}.eval_depth.{k}", got[k], io[f"{s}.eval_depth.{k}"],
                   rtol=METRIC_RTOL)
    # The SiLog losses see the prediction after cropping_img's in-place replacement.
    pred = np.where(np.isinf(pred), depth_metrics.MAX_DEPTH, pred)
    pred = np.where(np.isnan(pred), depth_metrics.MIN_DEPTH, pred)
    assert_close(f"{s}.siloss_metrics", depth_task.silog_loss(pred, gt, min_pred=None),
                 io[f"{s}.siloss_metrics"], rtol=METRIC_RTOL)
    assert_close(f"{s}.siloss_depth_head", depth_task.silog_loss(pred, gt),
                 io[f"{s}.siloss_depth_head"], rtol=METRIC_RTOL)
  mean = acc.result()
  for k in depth_metrics.METRIC_NAMES:
    assert_close(f"mean.eval_depth.{k}", mean[k], io[f"mean.eval_depth.{k}"],
                 rtol=METRIC_RTOL)


CHECKS = {
    "depth_metrics": check_depth_metrics,
}
# Kinds whose code is not written yet: skipped, with the reason.
NOT_YET = {}


@pytest.mark.parametrize("fx", kind_fixtures(), ids=lambda fx: f"{fx.kind}:{fx.name}")
def test_fixture(fx: Fixture):
  if fx.kind in NOT_YET:
    pytest.skip(f"fixture kind {fx.kind!r}: {NOT_YET[fx.kind]}")
  assert fx.kind in CHECKS, f"{fx.config_path}: unknown fixture_kind {fx.kind!r}"
  CHECKS[fx.kind](fx)
