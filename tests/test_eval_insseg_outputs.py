"""Instance-segmentation prediction files (ait_jax/evaluation/insseg_outputs.py)."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from ait_jax.evaluation import insseg_outputs as outputs

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning")

H, W = 60, 80
PIXEL = np.array([100, 150, 200])
NAMES = ["ball", "cube", "pillar"]


def _scene():
  image = np.broadcast_to(PIXEL.astype(np.uint8), (H, W, 3)).copy()
  boxes = np.array([[10, 20, 50, 55, 0.9], [30, 25, 70, 58, 0.6], [0, 0, 5, 5, 0.1]],
                   np.float32)
  masks = np.zeros((3, H, W), bool)
  for m, (x1, y1, x2, y2, _) in zip(masks, boxes.astype(int)):
    m[y1:y2, x1:x2] = True
  return image, boxes, np.array([2, 0, 1]), boxes[:, 4], masks


def _blend(pixel, label):
  return (1 - outputs.MASK_ALPHA) * pixel + outputs.MASK_ALPHA * np.array(
      outputs.class_color(label))


def test_overlay_png_blends_masks_in_class_colours(tmp_path):
  image, boxes, labels, scores, masks = _scene()
  paths = outputs.write_instance_prediction(image, boxes, labels, scores, masks, NAMES,
                                            tmp_path / "pred", "000042", 0.3, image_id=42)
  picture = np.asarray(Image.open(paths.overlay_png))
  assert paths.overlay_png.name == "000042_instances.png"
  assert picture.shape == (H, W, 3) and picture.dtype == np.uint8
  # Inside the first mask only (away from outlines and labels).
  np.testing.assert_array_equal(picture[45, 20], np.rint(_blend(PIXEL, 2)))
  # Where both masks overlap: the weaker one (label 0) first, then the stronger.
  np.testing.assert_array_equal(picture[45, 40], np.rint(_blend(_blend(PIXEL, 0), 2)))
  # The third detection is under the threshold: its mask is not drawn.
  np.testing.assert_array_equal(picture[2, 2], PIXEL)
  np.testing.assert_array_equal(picture[H - 1, W - 1], PIXEL)
  # A box outline pixel of the strongest detection (its right edge, below the label).
  np.testing.assert_array_equal(picture[50, 50], outputs.class_color(2))


def test_results_json_round_trips(tmp_path):
  image, boxes, labels, scores, masks = _scene()
  paths = outputs.write_instance_prediction(image, boxes, labels, scores, masks, NAMES,
                                            tmp_path, "img", 0.3, image_id=42,
                                            category_ids=[1, 2, 4])
  with open(paths.results_json) as f:
    results = json.load(f)
  assert len(results) == 3  # every detection, whatever its score
  for r, box, label, score, mask in zip(results, boxes, labels, scores, masks):
    assert r["image_id"] == 42 and r["category_id"] == [1, 2, 4][label]
    assert r["score"] == pytest.approx(score)
    x1, y1, x2, y2 = box[:4]
    assert r["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
    np.testing.assert_array_equal(mask_utils.decode(r["segmentation"]), mask)


def test_class_colours_are_fixed_and_distinct():
  colors = [outputs.class_color(i) for i in range(80)]
  assert colors == [outputs.class_color(i) for i in range(80)]
  assert len(set(colors[:20])) == 20


def test_no_detections(tmp_path):
  image = np.zeros((H, W, 3), np.uint8)
  paths = outputs.write_instance_prediction(image, np.zeros((0, 5)), [], [],
                                            np.zeros((0, H, W)), NAMES, tmp_path, "empty")
  np.testing.assert_array_equal(np.asarray(Image.open(paths.overlay_png)), image)
  with open(paths.results_json) as f:
    assert json.load(f) == []


def test_detections_without_masks(tmp_path):
  image, boxes, labels, scores, _ = _scene()
  paths = outputs.write_instance_prediction(image, boxes, labels, scores, None, NAMES,
                                            tmp_path, "det", 0.3)
  picture = np.asarray(Image.open(paths.overlay_png))
  np.testing.assert_array_equal(picture[45, 20], PIXEL)  # no mask blended in
  np.testing.assert_array_equal(picture[50, 50], outputs.class_color(2))  # the outline
  with open(paths.results_json) as f:
    results = json.load(f)
  assert [r["category_id"] for r in results] == [2, 0, 1]
  assert all("segmentation" not in r for r in results)
  assert results[0]["bbox"] == pytest.approx([10, 20, 40, 35])
