"""COCO evaluation (ait_jax/evaluation/coco.py) on tiny hand-made ground truths.

Expected values follow from COCO's 101-point interpolated precision: with recall
reaching only 1/2 at precision 1, AP = 51/101 (recall thresholds 0, 0.01, ..., 0.5).
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from ait_jax.evaluation import coco

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning")

CATEGORIES = [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}, {"id": 20, "name": "c"}]
HALF = 51 / 101
H, W = 200, 240


def _mask(box, h=H, w=W):
  x1, y1, x2, y2 = box
  m = np.zeros((h, w), np.uint8)
  m[y1:y2, x1:x2] = 1
  return m


def _write_gt(path, objects, image_ids=(1,)):
  """objects: (image_id, category_id, box x1 y1 x2 y2 in whole pixels)."""
  anns = []
  for i, (image_id, cat, box) in enumerate(objects):
    rle = mask_utils.encode(np.asfortranarray(_mask(box)))
    x1, y1, x2, y2 = box
    anns.append({"id": i + 1, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                 "area": float((x2 - x1) * (y2 - y1)), "bbox": [x1, y1, x2 - x1, y2 - y1],
                 "segmentation": {"size": [H, W], "counts": rle["counts"].decode()}})
  with open(path, "w") as f:
    json.dump({"images": [{"id": i, "height": H, "width": W, "file_name": f"{i}.jpg"}
                          for i in image_ids],
               "annotations": anns, "categories": CATEGORIES}, f)
  return str(path)


def _label(cat):
  return [c["id"] for c in CATEGORIES].index(cat)


def _predict(image_id, objects, scores=None):
  """A prediction of exactly `objects` ((category_id, box)), scored 1 by default."""
  boxes = np.array([b for _, b in objects], np.float32).reshape(-1, 4)
  masks = np.array([_mask(b) for _, b in objects], np.uint8).reshape(-1, H, W)
  scores = np.ones(len(objects)) if scores is None else scores
  return coco.image_prediction(image_id, boxes, scores, [_label(c) for c, _ in objects],
                               masks)


# small (< 32^2), medium and large objects in two images, three categories
OBJECTS = [(1, 3, (10, 10, 30, 30)), (1, 7, (50, 40, 110, 90)),
           (1, 3, (60, 100, 200, 190)), (2, 20, (5, 5, 25, 20)),
           (2, 7, (100, 20, 160, 70))]


def test_ground_truth_as_predictions_scores_one(tmp_path):
  gt = _write_gt(tmp_path / "gt.json", OBJECTS, image_ids=(1, 2))
  preds = [_predict(i, [(c, b) for j, c, b in OBJECTS if j == i]) for i in (1, 2)]
  metrics, summaries = coco.evaluate(preds, gt)
  assert set(metrics) == {f"{t}_{n}" for t in ("bbox", "segm")
                          for n in coco.SUMMARY_NAMES}
  for t in ("bbox", "segm"):
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR10", "AR100", "ARs", "ARm",
                 "ARl"):
      assert metrics[f"{t}_{name}"] == pytest.approx(1.0), (t, name)
    assert "Average Precision" in summaries[t]


def test_one_of_two_objects_missing(tmp_path):
  gt = _write_gt(tmp_path / "gt.json",
                 [(1, 7, (10, 10, 60, 50)), (1, 7, (100, 100, 150, 140))])
  metrics, _ = coco.evaluate([_predict(1, [(7, (10, 10, 60, 50))])], gt)
  for t in ("bbox", "segm"):
    assert metrics[f"{t}_AP"] == pytest.approx(HALF)
    assert metrics[f"{t}_AP50"] == pytest.approx(HALF)
    assert metrics[f"{t}_AP75"] == pytest.approx(HALF)
    assert metrics[f"{t}_AR100"] == pytest.approx(0.5)


def test_shifted_box_matches_below_iou_075(tmp_path):
  # A 100x10 box moved 16 px: IoU 840 / 1160 = 0.724, matched at the IoU thresholds
  # 0.50..0.70 (AP 1 there) and a false positive after the true one at 0.75..0.95
  # (AP 51/101 there).
  gt = _write_gt(tmp_path / "gt.json",
                 [(1, 3, (10, 10, 70, 60)), (1, 3, (100, 150, 200, 160))])
  pred = _predict(1, [(3, (10, 10, 70, 60)), (3, (116, 150, 216, 160))],
                  scores=[0.9, 0.8])
  metrics, _ = coco.evaluate([pred], gt)
  for t in ("bbox", "segm"):
    assert metrics[f"{t}_AP"] == pytest.approx((5 * 1.0 + 5 * HALF) / 10)
    assert metrics[f"{t}_AP50"] == pytest.approx(1.0)
    assert metrics[f"{t}_AP75"] == pytest.approx(HALF)
    assert metrics[f"{t}_AR100"] == pytest.approx(0.75)
  # The false positive scored first: precision 1/2 up to recall 1/2 at 0.75..0.95.
  pred = pred._replace(scores=np.array([0.8, 0.9], np.float32))
  metrics, _ = coco.evaluate([pred], gt)
  assert metrics["bbox_AP"] == pytest.approx((5 * 1.0 + 5 * HALF / 2) / 10)


def test_empty_predictions_give_zero(tmp_path):
  gt = _write_gt(tmp_path / "gt.json", OBJECTS, image_ids=(1, 2))
  evaluator = coco.CocoEvaluator(gt)
  evaluator.add(1, np.zeros((0, 4)), [], [])
  evaluator.add(2, np.zeros((0, 4)), [], [], masks=np.zeros((0, H, W), bool))
  metrics = evaluator.evaluate()
  for t in ("bbox", "segm"):
    for name in ("AP", "AP50", "APs", "APm", "APl", "AR100"):
      assert metrics[f"{t}_{name}"] == 0.0


def test_evaluated_images_are_the_predicted_ones(tmp_path):
  # Image 2's objects do not count unless image 2 is predicted (even with nothing).
  gt = _write_gt(tmp_path / "gt.json",
                 [(1, 7, (10, 10, 60, 50)), (2, 7, (10, 10, 60, 50))], image_ids=(1, 2))
  only_first = [_predict(1, [(7, (10, 10, 60, 50))])]
  assert coco.evaluate(only_first, gt, ["bbox"])[0]["bbox_AP"] == pytest.approx(1.0)
  both = only_first + [_predict(2, [])]
  assert coco.evaluate(both, gt, ["bbox"])[0]["bbox_AP"] == pytest.approx(HALF)


def test_labels_map_to_sorted_category_ids(tmp_path):
  gt_path = _write_gt(tmp_path / "gt.json", [(1, 7, (10, 10, 60, 50))])
  gt = coco.load_ground_truth(gt_path)
  assert coco.category_ids(gt) == [3, 7, 20]
  pred = coco.image_prediction(1, [[0, 0, 1, 1]] * 3, [0.5, 0.6, 0.7], [0, 1, 2])
  assert [r["category_id"] for r in coco.coco_results([pred], [3, 7, 20])] == [3, 7, 20]
  box = [[10, 10, 60, 50]]
  right = coco.image_prediction(1, box, [1.0], [1])
  wrong = coco.image_prediction(1, box, [1.0], [0])
  assert coco.evaluate([right], gt, ["bbox"])[0]["bbox_AP"] == pytest.approx(1.0)
  assert coco.evaluate([wrong], gt, ["bbox"])[0]["bbox_AP"] == 0.0
  with pytest.raises(ValueError, match="not all in"):
    coco.coco_results([coco.image_prediction(1, box, [1.0], [3])], [3, 7, 20])


def test_results_are_coco_format():
  masks = np.zeros((1, 20, 30), bool)
  masks[0, 5:9, 2:12] = True
  pred = coco.image_prediction(4, [[2.5, 5.0, 12.0, 9.25]], [0.25], [1], masks)
  (box,) = coco.coco_results([pred], [3, 7, 20], "bbox")
  assert box == {"image_id": 4, "category_id": 7, "score": 0.25,
                 "bbox": [2.5, 5.0, 9.5, 4.25]}
  (segm,) = coco.coco_results([pred], [3, 7, 20], "segm")
  assert coco.coco_results([pred._replace(masks=masks)], [3, 7, 20], "segm") == [segm]
  assert "bbox" not in segm and isinstance(segm["segmentation"]["counts"], str)
  np.testing.assert_array_equal(mask_utils.decode(segm["segmentation"]), masks[0])


def test_bad_inputs_are_named(tmp_path):
  gt = _write_gt(tmp_path / "gt.json", [(1, 7, (10, 10, 60, 50))])
  pred = _predict(1, [(7, (10, 10, 60, 50))])
  with pytest.raises(ValueError, match="more than once"):
    coco.evaluate([pred, pred], gt)
  with pytest.raises(ValueError, match="not in the ground truth"):
    coco.evaluate([pred._replace(image_id=9)], gt)
  with pytest.raises(ValueError, match="original image size"):
    coco.evaluate([pred._replace(masks=np.zeros((1, 10, 10)))], gt)
  with pytest.raises(ValueError, match="needs masks"):
    coco.CocoEvaluator(gt).add(1, [[0, 0, 1, 1]], [1.0], [0])
  evaluator = coco.CocoEvaluator(gt, iou_types=["bbox"])
  evaluator.add(9, [[0, 0, 1, 1]], [1.0], [0])
  with pytest.raises(ValueError, match="not in the ground truth"):
    evaluator.evaluate()


def test_evaluator_writes_metrics_and_results(tmp_path):
  gt = _write_gt(tmp_path / "gt.json", OBJECTS, image_ids=(1, 2))
  evaluator = coco.CocoEvaluator(gt)
  rng = np.random.default_rng(0)
  for i in (1, 2):
    objs = [(c, b) for j, c, b in OBJECTS if j == i]
    boxes = np.array([b for _, b in objs], np.float32)
    boxes += rng.uniform(-3, 3, boxes.shape)
    evaluator.add(i, boxes, rng.uniform(0.1, 1, len(objs)), [_label(c) for c, _ in objs],
                  np.array([_mask(b) for _, b in objs]))
  metrics = evaluator.evaluate(tmp_path / "eval", step=120)
  directory = coco.evaluation_dir(tmp_path / "eval", 120)
  assert directory.name == "coco_step_00000120"
  with open(directory / "coco_metrics.json") as f:
    written = json.load(f)
  assert written["step"] == 120 and written["num_images"] == 2
  assert {k: written[k] for k in metrics} == metrics
  # pycocotools reading the written results files gives the same numbers.
  gt_coco = coco.load_ground_truth(gt)
  for t in ("bbox", "segm"):
    dt = gt_coco.loadRes(str(directory / f"coco_{t}_results.json"))
    e = COCOeval(gt_coco, dt, t)
    e.evaluate()
    e.accumulate()
    e.summarize()
    expected = list(e.stats)
    assert [metrics[f"{t}_{n}"] for n in coco.SUMMARY_NAMES] == pytest.approx(expected)
  assert 0 < metrics["bbox_AP"] < 1


def test_gather_in_one_process_round_trips():
  masks = np.zeros((2, 12, 16), np.uint8)
  masks[0, 2:5, 3:9] = 1
  masks[1, 7:, :4] = 1
  preds = [coco.image_prediction(3, [[0.1, 0.2, 5.3, 7.7], [1, 2, 3, 4]],
                                 np.float32([1 / 3, 0.7]), [2, 0], masks),
           coco.image_prediction(5, np.zeros((0, 4)), [], [], np.zeros((0, 12, 16)))]
  out = coco.gather_predictions(preds, chunk_bytes=7)
  assert [p.image_id for p in out] == [3, 5]
  np.testing.assert_array_equal(out[0].boxes, preds[0].boxes)
  np.testing.assert_array_equal(out[0].scores, preds[0].scores)
  np.testing.assert_array_equal(out[0].labels, [2, 0])
  decoded = np.moveaxis(mask_utils.decode(out[0].masks), -1, 0)
  np.testing.assert_array_equal(decoded, masks)
  assert out[1].masks == [] and out[1].boxes.shape == (0, 4)


_TWO_PROCESSES = textwrap.dedent("""
  import json, sys
  import jax
  import numpy as np
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  port, pid, gt, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
  jax.distributed.initialize(f"localhost:{port}", 2, pid)
  from ait_jax.evaluation import coco
  preds = json.load(open(out + "/preds.json"))[pid]
  evaluator = coco.CocoEvaluator(gt, iou_types=["bbox", "segm"], chunk_bytes=50)
  for image_id, boxes, scores, labels, masks in preds:
    evaluator.add(image_id, np.float32(boxes).reshape(-1, 4), scores, labels,
                  np.uint8(masks).reshape(-1, %d, %d))
  metrics = evaluator.evaluate(out + "/eval", step=7)
  json.dump(metrics, open(out + f"/metrics_{pid}.json", "w"))
""" % (H, W))


def test_two_processes_gather_to_process_zero(tmp_path):
  gt = _write_gt(tmp_path / "gt.json", OBJECTS, image_ids=(1, 2, 3))
  rng = np.random.default_rng(1)
  per_image = {}
  for i in (1, 2, 3):
    objs = [(c, b) for j, c, b in OBJECTS if j == i]
    boxes = np.array([b for _, b in objs], np.float32).reshape(-1, 4)
    boxes = np.round(boxes + rng.uniform(-4, 4, boxes.shape)).astype(int)
    boxes = np.clip(boxes, 0, [W, H, W, H])
    per_image[i] = (i, boxes.tolist(), rng.uniform(0.1, 1, len(objs)).tolist(),
                    [_label(c) for c, _ in objs], [_mask(b).tolist() for b in boxes])
  # Process 0 holds image 2, process 1 images 3 and 1.
  with open(tmp_path / "preds.json", "w") as f:
    json.dump([[per_image[2]], [per_image[3], per_image[1]]], f)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, str(port), str(pid),
                             gt, str(tmp_path)], env=env, cwd=repo)
           for pid in (0, 1)]
  try:
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  expected, _ = coco.evaluate(
      [coco.image_prediction(i, np.float32(b).reshape(-1, 4), s, l,
                             np.uint8(m).reshape(-1, H, W))
       for i, b, s, l, m in per_image.values()], gt)
  for pid in (0, 1):
    with open(tmp_path / f"metrics_{pid}.json") as f:
      assert json.load(f) == expected
  directory = coco.evaluation_dir(tmp_path / "eval", 7)
  with open(directory / "coco_bbox_results.json") as f:
    assert sorted({r["image_id"] for r in json.load(f)}) == [1, 2]  # 3 has no objects
  with open(directory / "coco_metrics.json") as f:
    assert json.load(f)["num_images"] == 3


def test_parts_of_an_image_are_joined(tmp_path):
  """`partial_images`: an image's objects added one at a time score as if added
  together."""
  gt = _write_gt(tmp_path / "gt.json", OBJECTS, image_ids=(1, 2))
  whole = [_predict(i, [(c, b) for j, c, b in OBJECTS if j == i], [0.9, 0.5, 0.7][:n])
           for i, n in ((1, 3), (2, 2))]
  evaluator = coco.CocoEvaluator(gt, partial_images=True)
  for p in whole:
    for k in range(len(p.labels)):
      evaluator.add(p.image_id, p.boxes[k:k + 1], p.scores[k:k + 1], p.labels[k:k + 1],
                    [p.masks[k]])
  merged = coco.merge_images(evaluator.predictions)
  assert [p.image_id for p in merged] == [1, 2]
  np.testing.assert_array_equal(merged[0].labels, whole[0].labels)
  assert merged[0].masks == whole[0].masks
  assert evaluator.evaluate() == coco.evaluate(whole, gt)[0]
  with pytest.raises(ValueError, match="some parts have masks"):
    coco.merge_images([whole[0], whole[0]._replace(masks=None)])
