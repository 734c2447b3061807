"""The instance-mask tokenizer's evaluation (ait_jax/evaluation/mask_tokenizer.py) on
hand-made rectangles, with reconstructions chosen by hand in place of a VQ-VAE."""

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

import input_pipeline as ip
from ait_jax.evaluation import mask_tokenizer

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning")

H, W, S = 60, 80, 8
CATEGORIES = [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}, {"id": 20, "name": "c"}]


def _write_gt(path, objects):
  """objects: (image_id, category_id, box x1 y1 x2 y2 in whole pixels); each mask
  fills its box."""
  anns = []
  for i, (image_id, cat, (x1, y1, x2, y2)) in enumerate(objects):
    m = np.zeros((H, W), np.uint8)
    m[y1:y2, x1:x2] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    anns.append({"id": i + 1, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                 "area": float((x2 - x1) * (y2 - y1)), "bbox": [x1, y1, x2 - x1, y2 - y1],
                 "segmentation": {"size": [H, W], "counts": rle["counts"].decode()}})
  images = sorted({o[0] for o in objects})
  with open(path, "w") as f:
    json.dump({"images": [{"id": i, "height": H, "width": W, "file_name": f"{i}.jpg"}
                          for i in images],
               "annotations": anns, "categories": CATEGORIES}, f)
  return str(path)


def _evaluate(ann_file, reconstruct):
  """Runs the evaluator over every record in one batch; `reconstruct(record)` gives
  the (S, S) reconstruction."""
  source = ip.CocoMaskEvalSource(ann_file, mask_size=S)
  records = [source[i] for i in range(len(source))]
  batch = {k: np.stack([r[k] for r in records]) for k in records[0] if k[0] != "_"}
  batch["valid"] = np.ones(len(records), bool)
  recon = np.stack([reconstruct(r) for r in records]).astype(np.float32)
  evaluator = mask_tokenizer.MaskTokenizerEvaluator(ann_file, num_codes=4)
  evaluator.add(recon, np.zeros((len(records), 2), np.int64), batch)
  return records, evaluator.result()


def test_paste_reconstruction_closed_form():
  # Columns of a left-half reconstruction resized 4 -> 8 sample at -0.25, 0.25, ...:
  # 1, 1, 1, 0.75, 0.25, 0, 0, 0, so the left 4 pixels are inside.
  recon = np.zeros((4, 4), np.float32)
  recon[:, :2] = 1
  out = mask_tokenizer.paste_reconstruction(recon, (10, 5, 18, 9), 20, 30)
  want = np.zeros((20, 30), np.uint8)
  want[5:9, 10:14] = 1
  np.testing.assert_array_equal(out, want)


def test_eval_source_crops_as_the_reference(tmp_path):
  ann = _write_gt(tmp_path / "gt.json", [(1, 3, (10, 10, 30, 26)), (1, 7, (40, 5, 41, 20)),
                                         (2, 20, (0, 0, 16, 16))])
  source = ip.CocoMaskEvalSource(ann, mask_size=S)
  first, tiny, other = (source[i] for i in range(3))
  np.testing.assert_array_equal(first["box"], [10, 10, 30, 26])
  assert first["has_crop"] and (first["mask"] == 1).all() and first["mask"].shape == (S, S)
  assert first["label"] == 0 and tiny["label"] == 1 and other["label"] == 2
  assert not tiny["has_crop"] and (tiny["mask"] == 0).all()  # 1 px wide: no crop
  np.testing.assert_array_equal(other["image_size"], [H, W])


def test_identity_reconstruction_scores_ap_one(tmp_path):
  ann = _write_gt(tmp_path / "gt.json", [(1, 3, (10, 10, 30, 26)), (1, 7, (35, 20, 75, 58)),
                                         (2, 20, (3, 4, 13, 9))])
  _, metrics = _evaluate(ann, lambda r: r["mask"])
  assert metrics["mask_iou"] == 1.0 and metrics["recon_mse"] == 0.0
  assert metrics["segm_AP"] == pytest.approx(1.0)
  assert metrics["codebook_usage"] == 0.25  # code 0 of 4


def test_lost_and_tiny_masks_count_as_missed(tmp_path):
  # Class a is reconstructed exactly; class b's reconstruction is empty (IoU 0, a
  # false positive and a missed object); class c's box is 1 px wide, so it gets no
  # reconstruction. Per-class APs 1, 0, 0.
  ann = _write_gt(tmp_path / "gt.json", [(1, 3, (10, 10, 30, 26)), (1, 7, (35, 20, 75, 58)),
                                         (2, 20, (40, 5, 41, 20))])
  _, metrics = _evaluate(ann, lambda r: r["mask"] * (r["label"] == 0))
  assert metrics["mask_iou"] == 0.5  # of the two crops
  assert metrics["recon_mse"] == 0.5
  assert metrics["segm_AP"] == pytest.approx(1 / 3)
  assert metrics["segm_AR100"] == pytest.approx(1 / 3)
