"""Writing instance-segmentation predictions to disk (`--mode predict`).

Per image two files:
* `{stem}_instances.png`, for people: the image with every detection scored at
  least `score_threshold`, weakest first, as its mask blended in its class colour
  (`MASK_ALPHA`), its box outline and a `name score` label;
* `{stem}_instances.json`, COCO results of all detections, whatever their score (a
  threshold would bias AP): `image_id`, `category_id`, `bbox` `x, y, w, h`, `score`
  and, with masks, `segmentation` as compressed RLE, as `ait_jax.evaluation.coco`
  writes them.

Detection has no masks (`masks=None`): boxes and labels only.
"""

from __future__ import annotations

import colorsys
import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ait_jax.evaluation import coco

MASK_ALPHA = 0.5
BOX_WIDTH = 2
_GOLDEN = 0.618033988749895


class InstanceOutputPaths(NamedTuple):
  overlay_png: Path
  results_json: Path


def class_color(label: int) -> tuple[int, int, int]:
  """The RGB colour of a class: hues a golden angle apart, so neighbours differ."""
  r, g, b = colorsys.hsv_to_rgb((int(label) * _GOLDEN) % 1.0, 0.65, 0.95)
  return round(255 * r), round(255 * g), round(255 * b)


def overlay(image, boxes, labels, scores, masks, class_names: Sequence[str],
            score_threshold: float = 0.3) -> np.ndarray:
  """(H, W, 3) uint8: the detections scored >= `score_threshold` drawn on `image`
  (`masks` may be None).

  Each mask pixel becomes `(1 - MASK_ALPHA) * pixel + MASK_ALPHA * colour`, mask
  after mask from the weakest detection to the strongest, rounded at the end; boxes
  and labels are drawn over all masks.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
  labels = np.asarray(labels, np.int64).reshape(-1)
  if len(labels) and labels.max() >= len(class_names):
    raise ValueError(f"label {labels.max()} has no name among {len(class_names)} "
                     "class names")
  scores = np.asarray(scores, np.float32).reshape(-1)
  shown = [i for i in np.argsort(scores, kind="stable") if scores[i] >= score_threshold]
  canvas = image.astype(np.float64)
  for i in shown if masks is not None else ():
    inside = np.asarray(masks[i]) >= 0.5
    canvas[inside] = (1 - MASK_ALPHA) * canvas[inside] + MASK_ALPHA * np.asarray(
        class_color(labels[i]), np.float64)
  picture = Image.fromarray(np.rint(canvas).astype(np.uint8))
  draw = ImageDraw.Draw(picture)
  font = ImageFont.load_default()
  for i in shown:
    color = class_color(labels[i])
    x1, y1, x2, y2 = (float(v) for v in np.asarray(boxes[i])[:4])
    draw.rectangle((x1, y1, max(x1, x2), max(y1, y2)), outline=color, width=BOX_WIDTH)
    text = f"{class_names[labels[i]]} {scores[i]:.2f}"
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    height = bottom - top + 2
    y = y1 - height if y1 >= height else y1  # above the box, else inside its top
    draw.rectangle((x1, y, x1 + right - left + 2, y + height), fill=color)
    dark = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2] < 128
    draw.text((x1 + 1 - left, y + 1 - top), text, font=font,
              fill=(255, 255, 255) if dark else (0, 0, 0))
  return np.asarray(picture)


def write_instance_prediction(image, boxes, labels, scores, masks,
                              class_names: Sequence[str], out_dir, stem: str,
                              score_threshold: float = 0.3, *, image_id: int = 0,
                              category_ids: Sequence[int] | None = None
                              ) -> InstanceOutputPaths:
  """Writes one image's instances (see the module docstring); returns the paths.

  `image` (H, W, 3) uint8 original image; `boxes` (N, >=4) `x1, y1, x2, y2` pixels
  of it; `labels` (N,) 0-based classes named by `class_names`; `scores` (N,);
  `masks` (N, H, W) binary or None. The JSON's `category_id` is `category_ids[label]`
  (e.g. `coco.category_ids(ground_truth)`), the label itself without them.
  """
  image = np.asarray(image)
  boxes = np.asarray(boxes, np.float32)
  boxes = boxes[:, :4] if boxes.ndim == 2 else boxes.reshape(-1, 4)
  if masks is not None:
    masks = np.asarray(masks).reshape(-1, *image.shape[:2])
  pred = coco.image_prediction(image_id, boxes, scores, labels, masks)
  ids = list(range(len(class_names))) if category_ids is None else list(category_ids)
  results = coco.coco_results([pred], ids, "bbox")
  if masks is not None:
    results = [{**box, "segmentation": segm["segmentation"]} for box, segm in zip(
        results, coco.coco_results([pred], ids, "segm"))]
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = InstanceOutputPaths(out_dir / f"{stem}_instances.png",
                              out_dir / f"{stem}_instances.json")
  Image.fromarray(overlay(image, boxes, pred.labels, pred.scores, masks, class_names,
                          score_threshold)).save(paths.overlay_png)
  with open(paths.results_json, "w") as f:
    json.dump(results, f)
  return paths
