"""COCO box and mask AP through pycocotools, with predictions from every process.

A prediction is one image's detections: boxes `x1, y1, x2, y2` in original-image
pixels, scores, labels as 0-based contiguous class indices (label i is the i-th
smallest category id of the ground truth, as `input_pipeline.CocoInstancesSource`
numbers them) and optionally binary masks at the original image size. They become
COCO results the way mmdet's `CocoDataset` (the reference's evaluator) writes them:
boxes `x, y, w, h` with `w = x2 - x1`; masks as compressed RLE, scored with their
box's score and without a 'bbox' key, so that pycocotools sizes them by mask area
for APs/APm/APl (mmdet >= 2.12).

Metrics: the 12 numbers of `COCOeval.summarize` per IoU type, keyed
`{iou_type}_{name}` with the names of `SUMMARY_NAMES` (`bbox_AP`, ..., `segm_ARl`);
-1 where the evaluated images hold no ground truth (in that area range), as
pycocotools reports it. The evaluated images are the predicted ones, those with no
detection included (they count their ground truth as missed). mmdet sets maxDets to
(100, 300, 1000); AiT makes at most `num_query` = 100 detections per image, so its
AP values equal these and its AR@100 is `AR100`.

Multi-host (`CocoEvaluator`, `gather_predictions`): each process adds its own
images; masks are compressed to RLE as they are added (a full-size mask is
H x W bytes, its RLE a few hundred). Variable-length objects cannot be
all-gathered, so each process serialises its predictions to JSON bytes (boxes and
scores are float32, exact through JSON; RLE counts are ASCII), the byte counts are
all-gathered, and the bytes, zero-padded to the longest, are all-gathered with
`process_allgather` in chunks of at most `chunk_bytes` per process. Process 0
decodes them and evaluates; the metrics travel back to every process as float64
bytes, so all processes return the same values (a failure on process 0 is
reported on every process instead of leaving them waiting).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ait_jax.parallel import distributed

SUMMARY_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100",
                 "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")


class ImagePrediction(NamedTuple):
  """The detections of one image."""
  image_id: int
  boxes: np.ndarray   # (N, 4) float32 x1, y1, x2, y2, original-image pixels
  scores: np.ndarray  # (N,) float32
  labels: np.ndarray  # (N,) int, 0-based contiguous classes
  masks: np.ndarray | list[dict] | None = None  # (N, H, W) binary, or their RLEs


def image_prediction(image_id, boxes, scores, labels, masks=None) -> ImagePrediction:
  """An `ImagePrediction` with checked shapes; masks compressed to RLE."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  scores = np.asarray(scores, np.float32).reshape(-1)
  labels = np.asarray(labels, np.int64).reshape(-1)
  if not len(boxes) == len(scores) == len(labels):
    raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores and "
                     f"{len(labels)} labels differ in number")
  if masks is not None and not isinstance(masks, list):
    masks = encode_masks(masks)
  if masks is not None and len(masks) != len(boxes):
    raise ValueError(f"image {image_id}: {len(masks)} masks for {len(boxes)} boxes")
  return ImagePrediction(int(image_id), boxes, scores, labels, masks)


def encode_masks(masks) -> list[dict]:
  """Binary masks (N, H, W) (values >= 0.5 are inside) -> compressed RLEs whose
  `counts` are str (JSON-able; pycocotools reads both str and bytes)."""
  masks = np.asarray(masks)
  if masks.ndim != 3:
    raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
  binary = np.asfortranarray((masks >= 0.5).transpose(1, 2, 0).astype(np.uint8))
  rles = mask_utils.encode(binary) if len(masks) else []
  return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")}
          for r in rles]


def load_ground_truth(ground_truth: COCO | str | os.PathLike) -> COCO:
  """A pycocotools COCO object, or one loaded (quietly) from an instances JSON."""
  if isinstance(ground_truth, COCO):
    return ground_truth
  if not os.path.exists(ground_truth):
    raise FileNotFoundError(f"COCO ground truth {ground_truth}: file not found")
  with contextlib.redirect_stdout(io.StringIO()):
    return COCO(os.fspath(ground_truth))


def category_ids(ground_truth: COCO) -> list[int]:
  """The dataset's category ids, sorted: label i is category `category_ids[i]`."""
  return sorted(ground_truth.getCatIds())


def coco_results(predictions: Sequence[ImagePrediction], cat_ids: Sequence[int],
                 iou_type: str = "bbox") -> list[dict]:
  """COCO results of `iou_type` ('bbox': with `bbox`; 'segm': with `segmentation`).

  Predictions hold arrays, as `image_prediction` makes them; label i becomes
  category `cat_ids[i]`.
  """
  if iou_type not in IOU_TYPES:
    raise ValueError(f"iou_type {iou_type!r} is not one of {IOU_TYPES}")
  results = []
  for p in predictions:
    if len(p.labels) and (p.labels.min() < 0 or p.labels.max() >= len(cat_ids)):
      raise ValueError(f"image {p.image_id}: labels {sorted(set(p.labels.tolist()))} "
                       f"are not all in [0, {len(cat_ids)}), the dataset's classes")
    if iou_type == "segm" and p.masks is None and len(p.labels):
      raise ValueError(f"image {p.image_id}: mask AP ('segm') needs masks")
    masks = p.masks
    if iou_type == "segm" and masks is not None and not isinstance(masks, list):
      masks = encode_masks(masks)
    xywh = np.concatenate([p.boxes[:, :2], p.boxes[:, 2:] - p.boxes[:, :2]], axis=1)
    for i, (label, score) in enumerate(zip(p.labels, p.scores)):
      result = {"image_id": p.image_id, "category_id": int(cat_ids[label]),
                "score": float(score)}
      if iou_type == "bbox":
        result["bbox"] = [float(v) for v in xywh[i]]
      else:
        result["segmentation"] = masks[i]
      results.append(result)
  return results


def write_results_json(results: Sequence[dict], path) -> Path:
  """Writes COCO results (a JSON list, as `COCO.loadRes` reads) to `path`."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as f:
    json.dump(list(results), f)
  return path


def _load_results(gt: COCO, results: list[dict]) -> COCO:
  """`gt.loadRes(results)`, which fails on an empty list: then an empty result set."""
  with contextlib.redirect_stdout(io.StringIO()):
    if results:
      return gt.loadRes([dict(r) for r in results])  # loadRes writes into the dicts
    empty = COCO()
    empty.dataset = {"images": list(gt.dataset["images"]),
                     "categories": list(gt.dataset["categories"]), "annotations": []}
    empty.createIndex()
    return empty


def _check_image_ids(gt: COCO, predictions: Sequence[ImagePrediction]) -> list[int]:
  ids = [p.image_id for p in predictions]
  if not ids:
    raise ValueError("COCO evaluation got no images")
  seen, repeated = set(), set()
  for i in ids:
    (repeated if i in seen else seen).add(i)
  if repeated:
    raise ValueError(f"images {sorted(repeated)[:10]} are predicted more than once; "
                     "drop the evaluation loader's padding records (valid=False)")
  unknown = sorted(seen - set(gt.getImgIds()))
  if unknown:
    raise ValueError(f"images {unknown[:10]} are not in the ground truth")
  for p in predictions:
    info = gt.imgs[p.image_id]
    for rle in p.masks if isinstance(p.masks, list) else []:
      if list(rle["size"]) != [info["height"], info["width"]]:
        raise ValueError(f"image {p.image_id}: a mask is {rle['size'][0]}x"
                         f"{rle['size'][1]} but the image is {info['height']}x"
                         f"{info['width']}; paste masks at the original image size")
  return ids


def evaluate(predictions: Sequence[ImagePrediction], ground_truth,
             iou_types: Sequence[str] = IOU_TYPES) -> tuple[dict[str, float], dict]:
  """(metrics, {iou_type: summary text}) of these images' predictions.

  `ground_truth` is a COCO object or the instances JSON path. Runs in this
  process only (see `CocoEvaluator` for several).
  """
  gt = load_ground_truth(ground_truth)
  predictions = [image_prediction(*p) for p in predictions]  # masks as RLE, once
  image_ids = _check_image_ids(gt, predictions)
  cat_ids = category_ids(gt)
  metrics, summaries = {}, {}
  for iou_type in iou_types:
    dt = _load_results(gt, coco_results(predictions, cat_ids, iou_type))
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
      coco_eval = COCOeval(gt, dt, iou_type)
      coco_eval.params.imgIds = image_ids
      coco_eval.evaluate()
      coco_eval.accumulate()
      coco_eval.summarize()
    metrics.update({f"{iou_type}_{name}": float(v)
                    for name, v in zip(SUMMARY_NAMES, coco_eval.stats)})
    summaries[iou_type] = text.getvalue()
  return metrics, summaries


# --- several processes -------------------------------------------------------------

def merge_images(predictions: Sequence[ImagePrediction]) -> list[ImagePrediction]:
  """One prediction per image: the parts of each image joined, in first-seen order."""
  parts: dict[int, list[ImagePrediction]] = {}
  for p in predictions:
    parts.setdefault(p.image_id, []).append(image_prediction(*p))
  merged = []
  for image_id, ps in parts.items():
    with_masks = [p.masks is not None for p in ps]
    if any(with_masks) and not all(with_masks):
      raise ValueError(f"image {image_id}: some parts have masks and some do not")
    masks = [m for p in ps for m in p.masks] if all(with_masks) else None
    merged.append(ImagePrediction(
        image_id, np.concatenate([p.boxes for p in ps]),
        np.concatenate([p.scores for p in ps]),
        np.concatenate([p.labels for p in ps]), masks))
  return merged


def _to_json(p: ImagePrediction) -> dict:
  return {"image_id": p.image_id, "boxes": p.boxes.tolist(), "scores": p.scores.tolist(),
          "labels": p.labels.tolist(), "masks": p.masks}


def _from_json(d: dict) -> ImagePrediction:
  return ImagePrediction(int(d["image_id"]),
                         np.asarray(d["boxes"], np.float32).reshape(-1, 4),
                         np.asarray(d["scores"], np.float32),
                         np.asarray(d["labels"], np.int64), d["masks"])


def gather_predictions(predictions: Sequence[ImagePrediction], *,
                       chunk_bytes: int = 1 << 26) -> list[ImagePrediction] | None:
  """Every process's predictions, in process order, on process 0; None elsewhere.

  A collective: every process calls it, with its own (possibly empty) list. Masks
  come back as RLEs.
  """
  payload = json.dumps([_to_json(image_prediction(*p)) for p in predictions]).encode()
  gathered = distributed.allgather_bytes(payload, chunk_bytes)
  if jax.process_index() != 0:
    return None
  return [_from_json(d) for data in gathered for d in json.loads(data)]


def _broadcast_metrics(values: np.ndarray | None, count: int) -> np.ndarray:
  """Process 0's float64 `values` (count,) on every process; NaN means it failed."""
  raw = np.zeros((count * 8,), np.uint8)
  if values is not None:
    raw[:] = np.asarray(values, np.float64).view(np.uint8)
  raw = np.asarray(multihost_utils.broadcast_one_to_all(raw), np.uint8)
  return raw.view(np.float64)


def evaluation_dir(out_dir, step: int) -> Path:
  """Where `CocoEvaluator.evaluate` writes the evaluation of `step`."""
  return Path(out_dir) / f"coco_step_{int(step):08d}"


class CocoEvaluator:
  """Collects this process's predictions, then evaluates them all on process 0.

  `add` once per image (masks are compressed at once), or, with `partial_images`,
  any number of times per image from any process (the parts are joined before
  evaluating); `evaluate` is a collective that every process calls once (see the
  module docstring). The ground truth is loaded on process 0 only, when it is first
  needed.
  """

  def __init__(self, ground_truth, *, iou_types: Sequence[str] = IOU_TYPES,
               chunk_bytes: int = 1 << 26, partial_images: bool = False):
    bad = [t for t in iou_types if t not in IOU_TYPES]
    if bad or not iou_types:
      raise ValueError(f"iou_types {list(iou_types)} must be among {IOU_TYPES}")
    self.ground_truth = ground_truth
    self.iou_types = tuple(iou_types)
    self.chunk_bytes = chunk_bytes
    self.partial_images = partial_images
    self.predictions: list[ImagePrediction] = []

  @property
  def metric_names(self) -> list[str]:
    return [f"{t}_{n}" for t in self.iou_types for n in SUMMARY_NAMES]

  def add(self, image_id, boxes, scores, labels, masks=None) -> None:
    """One image's detections (see `ImagePrediction`); masks (N, H, W) binary at the
    original image size, required for 'segm'."""
    if "segm" in self.iou_types and masks is None and len(np.asarray(labels).reshape(-1)):
      raise ValueError(f"image {image_id}: mask AP ('segm') needs masks")
    self.predictions.append(image_prediction(image_id, boxes, scores, labels,
                                             masks if "segm" in self.iou_types else None))

  def evaluate(self, out_dir=None, step: int | None = None) -> dict[str, float]:
    """The metrics of all processes' predictions, on every process.

    With `out_dir`, process 0 writes `evaluation_dir(out_dir, step)/`
    `coco_metrics.json` (step, metrics, pycocotools' summary tables) and
    `coco_{iou_type}_results.json` (the COCO results).
    """
    if out_dir is not None and step is None:
      raise ValueError("writing the evaluation under out_dir needs its step")
    everything = gather_predictions(self.predictions, chunk_bytes=self.chunk_bytes)
    values, error = None, None
    if everything is not None:
      try:
        if self.partial_images:
          everything = merge_images(everything)
        metrics, summaries = evaluate(everything, self._gt(), self.iou_types)
        if out_dir is not None:
          self._write(everything, metrics, summaries, evaluation_dir(out_dir, step), step)
        values = [metrics[k] for k in self.metric_names]
      except Exception as e:  # pylint: disable=broad-except
        error = e
        values = [np.nan] * len(self.metric_names)
    values = _broadcast_metrics(values, len(self.metric_names))
    if error is not None:
      raise error
    if np.isnan(values).any():
      raise RuntimeError("COCO evaluation failed on process 0; see its log")
    return dict(zip(self.metric_names, (float(v) for v in values)))

  def _gt(self) -> COCO:
    self.ground_truth = load_ground_truth(self.ground_truth)
    return self.ground_truth

  def _write(self, predictions, metrics, summaries, directory: Path, step: int) -> None:
    cat_ids = category_ids(self._gt())
    for iou_type in self.iou_types:
      write_results_json(coco_results(predictions, cat_ids, iou_type),
                         directory / f"coco_{iou_type}_results.json")
    with open(directory / "coco_metrics.json", "w") as f:
      json.dump({"step": int(step), "num_images": len(predictions), **metrics,
                 "summary": summaries}, f, indent=1)
