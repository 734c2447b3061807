"""Instance-segmentation transforms (grain), after the reference's mmdet pipelines.

Training (`insseg_train_pipeline` of configs/swinv2b_640reso_inssegonly.py, the
large-scale-jitter pipeline): `Resize(img_scale=(640, 640), ratio_range=(0.1,
3.0), multiscale_mode='range', keep_ratio=True)`, `RandomCrop(crop_size=(640,
640), crop_type='absolute', recompute_bbox=False, allow_negative_crop=True)`,
`FilterAnnotations(min_gt_bbox_wh=(1e-2, 1e-2))`, `RandomFlip(0.5)`,
`Normalize(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375])`,
`Pad(size=(640, 640))`. Test: `Resize((640, 640), keep_ratio=True)`,
`Normalize`, `Pad`.

Records carry `boxes` (N, 4) float32 `x1, y1, x2, y2` in pixels, `labels`
(N,) int32, `masks` (N, H, W) uint8; every geometric op moves all three with the
image. Crowd annotations are dropped first: mmdet files them under
`gt_bboxes_ignore`, which the reference pipeline never collects.
"""

from typing import Sequence

import grain
import numpy as np

from ait_jax.tasks.masks import crop_masks
from input_pipeline import resize
from input_pipeline.transforms_common import DropKeys
from input_pipeline.transforms_common import Record

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
_INSTANCE_KEYS = ("boxes", "labels", "masks")


def _select(record: Record, keep: np.ndarray) -> Record:
  return {**record, **{k: record[k][keep] for k in _INSTANCE_KEYS
                       if k in record}}


def _clip_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
  boxes = boxes.copy()
  boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, width)
  boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, height)
  return boxes


class DropCrowd(grain.transforms.Map):
  """Removes crowd instances (mmdet's `gt_bboxes_ignore`) and the crowd flags."""

  def map(self, record: Record) -> Record:
    crowd = record["crowd"]
    out = _select(record, ~crowd)
    del out["crowd"]
    return out


class LargeScaleJitter(grain.transforms.RandomMap):
  """mmdet `Resize` (range mode, keep ratio) then `RandomCrop` (absolute).

  The ratio is U(0.1, 3.0); the target scale is `int(640 * ratio)` on both
  edges and mmcv `imrescale` fits the image into it (bilinear; masks nearest).
  Boxes are scaled by `new / old` per axis and clipped to the resized image.
  The crop is `min(640, side)` per axis at a uniform integer offset; boxes are
  shifted, clipped to the crop, and those left with no area are dropped with
  their labels and masks. A crop with no instance left is kept
  (`allow_negative_crop=True`). Only the cropped window is ever resized.
  """

  def __init__(self, image_size: tuple[int, int] = (640, 640),
               ratio_range: tuple[float, float] = (0.1, 3.0)):
    self.image_size = tuple(image_size)
    self.ratio_range = tuple(ratio_range)

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    image = record["image"]
    h, w = image.shape[:2]
    lo, hi = self.ratio_range
    ratio = rng.random() * (hi - lo) + lo
    scale = (int(self.image_size[1] * ratio), int(self.image_size[0] * ratio))
    new_h, new_w = resize.rescale_size(h, w, scale)
    crop_h, crop_w = min(self.image_size[0], new_h), min(self.image_size[1],
                                                          new_w)
    y0 = int(rng.integers(0, new_h - crop_h + 1))
    x0 = int(rng.integers(0, new_w - crop_w + 1))
    window = (y0, y0 + crop_h, x0, x0 + crop_w)

    factor = np.array([new_w / w, new_h / h] * 2, np.float32)
    boxes = _clip_boxes(record["boxes"] * factor, new_h, new_w)
    boxes = _clip_boxes(boxes - np.array([x0, y0, x0, y0], np.float32),
                        crop_h, crop_w)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    out = {**record, "boxes": boxes,
           "image": resize.resize_bilinear(image, new_h, new_w, window)}
    out = _select(out, keep)
    out["masks"] = resize.resize_nearest(out["masks"], new_h, new_w, window)
    return out


class FilterSmallBoxes(grain.transforms.Map):
  """mmdet `FilterAnnotations(min_gt_bbox_wh)`: keep w > min_w and h > min_h.

  mmdet returns None (and redraws another image) when this removes every box;
  here the record is kept with no instances, as for an empty crop.
  """

  def __init__(self, min_wh: tuple[float, float] = (1e-2, 1e-2)):
    self.min_wh = min_wh

  def map(self, record: Record) -> Record:
    boxes = record["boxes"]
    keep = ((boxes[:, 2] - boxes[:, 0] > self.min_wh[0])
            & (boxes[:, 3] - boxes[:, 1] > self.min_wh[1]))
    return _select(record, keep)


class RandomFlip(grain.transforms.RandomMap):
  """mmdet `RandomFlip(flip_ratio)`, horizontal: x -> W - x for boxes."""

  def __init__(self, p: float = 0.5):
    self.p = p

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    if rng.random() >= self.p:
      return record
    width = record["image"].shape[1]
    boxes = record["boxes"]
    flipped = boxes.copy()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    out = {**record, "boxes": flipped,
           "image": np.ascontiguousarray(record["image"][:, ::-1])}
    if "masks" in record:
      out["masks"] = np.ascontiguousarray(record["masks"][:, :, ::-1])
    return out


class Normalize(grain.transforms.Map):
  """mmcv `imnormalize`: float32 `(rgb - mean) * (1 / std)`, 0-255 units."""

  def __init__(self, mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD):
    self.mean = np.asarray(mean, np.float32)
    self.inv_std = np.asarray(1.0 / np.asarray(std, np.float64), np.float32)

  def map(self, record: Record) -> Record:
    image = record["image"].astype(np.float32)
    image -= self.mean
    image *= self.inv_std
    return {**record, "image": image}


class Pad(grain.transforms.Map):
  """mmdet `Pad(size)`: zeros at the bottom and right of image and masks.

  Records `img_shape`, the (h, w) before padding (mmdet's `img_shape` meta).
  """

  def __init__(self, size: tuple[int, int] = (640, 640)):
    self.size = tuple(size)

  def map(self, record: Record) -> Record:
    image = record["image"]
    h, w = image.shape[:2]
    th, tw = self.size
    if h > th or w > tw:
      raise ValueError(f"Pad: image {h}x{w} is larger than {th}x{tw}")
    out = {**record, "img_shape": np.array([h, w], np.int32),
           "image": np.pad(image, ((0, th - h), (0, tw - w), (0, 0)))}
    if "masks" in record:
      out["masks"] = np.pad(record["masks"], ((0, 0), (0, th - h), (0, tw - w)))
    return out


class MaskCrops(grain.transforms.Map):
  """Target masks of the reference head: `crop_masks` of each mask in its box.

  InsSegHead.get_seq crops the padded masks with the final boxes (roi_align,
  aligned, >= 0.5) to `mask_size` (64 in the configs). Run after `Pad`.
  """

  def __init__(self, size: int = 64):
    self.size = size

  def map(self, record: Record) -> Record:
    crops = crop_masks(record["masks"], record["boxes"],
                                      self.size)
    return {**record, "mask_crops": crops}


class PadInstances(grain.transforms.Map):
  """Pads the instance arrays to `max_instances` so records batch.

  Adds `num_instances`; padded labels are -1. Drops the full `masks` unless
  `keep_masks` (they cost max_instances x H x W bytes per image). Instances
  beyond `max_instances` are cut and reported as skipped.
  """

  def __init__(self, max_instances: int = 100, keep_masks: bool = False):
    self.max_instances = max_instances
    self.keep_masks = keep_masks

  def map(self, record: Record) -> Record:
    m = self.max_instances
    n = len(record["labels"])
    out = dict(record)
    if n > m:
      out["_skipped"] = list(record.get("_skipped", [])) + [
          f"{record.get('_origin', 'record')}: {n - m} instances beyond "
          f"max_instances={m} dropped"]
      n = m

    def pad(x, value=0):
      x = x[:m]
      return np.pad(x, [(0, m - len(x))] + [(0, 0)] * (x.ndim - 1),
                    constant_values=value)

    out["boxes"] = pad(record["boxes"]).astype(np.float32)
    out["labels"] = pad(record["labels"], -1).astype(np.int32)
    out["num_instances"] = np.int32(n)
    if "mask_crops" in record:
      out["mask_crops"] = pad(record["mask_crops"])
    if self.keep_masks:
      out["masks"] = pad(record["masks"])
    else:
      out.pop("masks", None)
    return out


class TestResize(grain.transforms.Map):
  """mmdet test `Resize(img_scale, keep_ratio=True)`: fit, bilinear.

  Records `ori_shape` (h, w) and `scale_factor` (w_scale, h_scale, w_scale,
  h_scale), which map predictions back to the original image.
  """

  def __init__(self, scale: tuple[int, int] = (640, 640)):
    self.scale = tuple(scale)

  def map(self, record: Record) -> Record:
    image = record["image"]
    h, w = image.shape[:2]
    new_h, new_w = resize.rescale_size(h, w, self.scale)
    return {**record, "image": resize.resize_bilinear(image, new_h, new_w),
            "ori_shape": np.array([h, w], np.int32),
            "scale_factor": np.array([new_w / w, new_h / h] * 2, np.float32)}


def insseg_train_ops(image_size: tuple[int, int] = (640, 640),
                     ratio_range: tuple[float, float] = (0.1, 3.0),
                     max_instances: int = 100, mask_crop_size: int | None = 64,
                     keep_masks: bool = False) -> list:
  """The LSJ training pipeline, ending with fixed-size instance arrays."""
  ops = [DropCrowd(), LargeScaleJitter(image_size, ratio_range),
         FilterSmallBoxes(), RandomFlip(), Normalize(), Pad(image_size)]
  if mask_crop_size is not None:
    ops.append(MaskCrops(mask_crop_size))
  return ops + [PadInstances(max_instances, keep_masks)]


def insseg_test_ops(image_size: tuple[int, int] = (640, 640)) -> list:
  """The test pipeline: keep-ratio resize, normalise, pad (no annotations)."""
  return [DropKeys(("crowd",) + _INSTANCE_KEYS), TestResize(image_size),
          Normalize(), Pad(image_size)]
