"""NYUv2 depth metrics as the reference computes them (ait/code/model/depth/metrics.py).

Per image: non-finite predictions are replaced (inf -> max depth, nan -> min depth), the
pixels with `min_depth < gt < max_depth` inside the fixed Eigen crop are kept, and nine
metrics are computed; the dataset value is the mean over images.
"""

import numpy as np

METRIC_NAMES = ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10",
                "silog")
MIN_DEPTH = 1e-3
MAX_DEPTH = 10.0
# The Eigen crop on the 480x640 NYU frame: rows 45..470, columns 41..600.
EIGEN_CROP = (slice(45, 471), slice(41, 601))


def eval_pixels(pred: np.ndarray, gt: np.ndarray, *, min_depth: float = MIN_DEPTH,
                max_depth: float = MAX_DEPTH) -> tuple[np.ndarray, np.ndarray]:
  """The (pred, gt) pixels that count, after replacing inf/nan predictions."""
  pred = np.asarray(pred, np.float64)
  gt = np.asarray(gt, np.float64)
  if pred.shape != gt.shape:
    raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
  pred = np.where(np.isposinf(pred) | np.isneginf(pred), max_depth, pred)
  pred = np.where(np.isnan(pred), min_depth, pred)
  in_crop = np.zeros(gt.shape, bool)
  in_crop[EIGEN_CROP] = True
  valid = (gt > min_depth) & (gt < max_depth) & in_crop
  return pred[valid], gt[valid]


def depth_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
  """The nine metrics of one image (eval_depth(*cropping_img(pred, gt)))."""
  p, g = eval_pixels(pred, gt)
  if p.size == 0:
    raise ValueError("no valid ground-truth pixel inside the Eigen crop")
  thresh = np.maximum(g / p, p / g)
  diff = p - g
  diff_log = np.log(p) - np.log(g)
  return {
      "d1": float(np.mean(thresh < 1.25)),
      "d2": float(np.mean(thresh < 1.25**2)),
      "d3": float(np.mean(thresh < 1.25**3)),
      "abs_rel": float(np.mean(np.abs(diff) / g)),
      "sq_rel": float(np.mean(diff**2 / g)),
      "rmse": float(np.sqrt(np.mean(diff**2))),
      "rmse_log": float(np.sqrt(np.mean(diff_log**2))),
      "log10": float(np.mean(np.abs(np.log10(p) - np.log10(g)))),
      "silog": float(np.sqrt(np.mean(diff_log**2) - 0.5 * np.mean(diff_log)**2)),
  }


class DepthMetricsAccumulator:
  """Averages per-image metrics over a dataset, as the reference's `evaluate` does."""

  def __init__(self):
    self.sums = dict.fromkeys(METRIC_NAMES, 0.0)
    self.count = 0

  def add(self, pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    m = depth_metrics(pred, gt)
    for k in METRIC_NAMES:
      self.sums[k] += m[k]
    self.count += 1
    return m

  def result(self) -> dict[str, float]:
    if not self.count:
      raise ValueError("no image was evaluated")
    return {k: v / self.count for k, v in self.sums.items()}
