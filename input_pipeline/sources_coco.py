"""COCO instances through pycocotools, as grain random-access sources.

`CocoInstancesSource` follows mmdet's `CocoDataset` (the reference's dataset
class): categories map to labels 0..K-1 in sorted id order; in training, images
without annotations or with a side under 32 px are left out; an annotation is
used when it is not `ignore`, overlaps the image, has `area > 0` and a box at
least 1 px wide and high. Crowd annotations are kept with `crowd=True` (the
transforms drop them, as mmdet's training pipeline does).

`CocoMaskSource` is the instance-mask tokenizer's data (the reference's
preprocessed "maskcoco"), made on the fly: each non-crowd annotation's mask,
cropped to its box and resized to `mask_size` the way the reference head makes
its targets (`ait_jax.tasks.masks.crop_masks`). `CocoMaskEvalSource` makes the
crops of the reference's mask-AP evaluation of that tokenizer (`vae/utils/eval_coco.py`).

The COCO index is loaded once per process (workers reload it from the JSON
rather than receive a pickled copy).
"""

import contextlib
import functools
import io
import os

import numpy as np
from pycocotools.coco import COCO

from input_pipeline import image_io
from input_pipeline import resize
from ait_jax.tasks.masks import crop_masks
from input_pipeline import masks as masks_lib
from input_pipeline.errors import DataError


def _load_coco(ann_file: str) -> COCO:
  if not os.path.exists(ann_file):
    raise DataError(f"{ann_file}: annotation file not found")
  with contextlib.redirect_stdout(io.StringIO()):
    return COCO(ann_file)


class _CocoBase:
  """Lazily loaded COCO index shared by the sources below."""

  def __init__(self, ann_file: str):
    self.ann_file = ann_file
    self.cat_ids = sorted(self.coco.getCatIds())
    self.cat_to_label = {c: i for i, c in enumerate(self.cat_ids)}

  @functools.cached_property
  def coco(self) -> COCO:
    return _load_coco(self.ann_file)

  def __getstate__(self):
    state = dict(self.__dict__)
    state.pop("coco", None)
    return state

  def _box(self, ann: dict) -> np.ndarray:
    """The annotation's `x, y, w, h` (raises unless 4 finite numbers)."""
    box = np.asarray(ann.get("bbox", []), np.float64)
    if box.shape != (4,) or not np.isfinite(box).all():
      raise DataError(f"{self._where(ann)}: bbox {ann.get('bbox')} is not 4 "
                      "finite numbers")
    return box

  def _usable(self, ann: dict, height: int, width: int) -> bool:
    """mmdet `_parse_ann_info`'s filters (raises on a non-finite box)."""
    box = self._box(ann)
    if ann.get("ignore", False):
      return False
    x, y, w, h = box
    inter_w = max(0, min(x + w, width) - max(x, 0))
    inter_h = max(0, min(y + h, height) - max(y, 0))
    return (inter_w * inter_h > 0 and ann.get("area", w * h) > 0 and w >= 1
            and h >= 1 and ann["category_id"] in self.cat_to_label)

  def _where(self, ann: dict) -> str:
    return f"{self.ann_file} annotation {ann.get('id')}"


class CocoInstancesSource(_CocoBase):
  """COCO images with boxes, labels, crowd flags and decoded masks.

  Records: `image` uint8 (H, W, 3), `image_id` int64, and with annotations
  (`train=True`) `boxes` float32 (N, 4) `x1, y1, x2, y2`, `labels` int32 (N,),
  `crowd` bool (N,), `masks` uint8 (N, H, W). `train=False` is mmdet's test
  mode: every image, no annotations decoded.

  A bad annotation (non-finite box, empty or degenerate polygon, RLE of the
  wrong size, empty mask) raises DataError naming the annotation file, id and
  image; with `skip_bad_annotations` it is left out and reported instead.
  """

  def __init__(self, ann_file: str, image_dir: str, *, train: bool = True,
               min_size: int = 32, skip_bad_annotations: bool = False):
    super().__init__(ann_file)
    self.image_dir = image_dir
    self.train = train
    self.skip_bad_annotations = skip_bad_annotations
    ids = list(self.coco.imgs)
    if train:
      with_anns = {a["image_id"] for a in self.coco.anns.values()
                   if a["category_id"] in self.cat_to_label}
      ids = [i for i in ids if i in with_anns and min(
          self.coco.imgs[i]["width"], self.coco.imgs[i]["height"]) >= min_size]
    if not ids:
      raise DataError(f"{ann_file}: no usable images")
    self.image_ids = ids

  def __len__(self) -> int:
    return len(self.image_ids)

  def __getitem__(self, index: int) -> dict:
    info = self.coco.imgs[self.image_ids[index]]
    path = os.path.join(self.image_dir, info["file_name"])
    image = image_io.read_rgb(path)
    height, width = int(info["height"]), int(info["width"])
    if image.shape[:2] != (height, width):
      raise DataError(f"{path}: image is {image.shape[0]}x{image.shape[1]} but "
                      f"{self.ann_file} says {height}x{width}")
    record = {"image": image, "image_id": np.int64(info["id"]),
              "_origin": path}
    if self.train:
      record.update(self.read_annotations(info["id"], height, width, path))
    return record

  def read_annotations(self, image_id: int, height: int, width: int,
                       path: str) -> dict:
    """The usable annotations of one image, masks decoded (see class doc)."""
    boxes, labels, crowd, masks, skipped = [], [], [], [], []
    for ann in self.coco.imgToAnns.get(image_id, []):
      try:
        if not self._usable(ann, height, width):
          continue
        mask = masks_lib.annotation_mask(
            ann.get("segmentation"), height, width,
            f"{self._where(ann)} (image {path})")
      except DataError as e:
        if not self.skip_bad_annotations:
          raise
        skipped.append(str(e))
        continue
      x, y, w, h = ann["bbox"]
      boxes.append([x, y, x + w, y + h])
      labels.append(self.cat_to_label[ann["category_id"]])
      crowd.append(bool(ann.get("iscrowd", 0)))
      masks.append(mask)
    return {
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "labels": np.asarray(labels, np.int32),
        "crowd": np.asarray(crowd, bool),
        "masks": (np.stack(masks) if masks
                  else np.zeros((0, height, width), np.uint8)),
        "_skipped": skipped,
    }

  def __repr__(self) -> str:
    return f"CocoInstancesSource({self.ann_file!r}, {len(self)} images)"


class _CocoAnnotationSource(_CocoBase):
  """One record per annotation id in `self.ann_ids`."""
  ann_ids: list[int]

  def __len__(self) -> int:
    return len(self.ann_ids)

  def _annotation(self, index: int) -> tuple[dict, int, int, str]:
    """(annotation, image height, image width, where) of record `index`."""
    ann = self.coco.anns[self.ann_ids[index]]
    info = self.coco.imgs[ann["image_id"]]
    return ann, int(info["height"]), int(info["width"]), self._where(ann)


class CocoMaskSource(_CocoAnnotationSource):
  """Box-cropped binary instance masks for the mask tokenizer ("maskcoco").

  One record per usable non-crowd annotation: `mask` float32 (S, S) in {0, 1}
  (roi_align of the full mask in the box `x, y, x + w, y + h`, then >= 0.5),
  `box` float32 (4,), `image_id` and `ann_id` int64. No image is read.
  """

  def __init__(self, ann_file: str, *, mask_size: int = 64):
    super().__init__(ann_file)
    self.mask_size = mask_size
    ids = []
    for ann in self.coco.anns.values():
      info = self.coco.imgs.get(ann["image_id"])
      if info is None or ann.get("iscrowd", 0):
        continue
      try:
        usable = self._usable(ann, info["height"], info["width"])
      except DataError:
        usable = True  # Kept, so that reading it reports the problem.
      if usable:
        ids.append(ann["id"])
    if not ids:
      raise DataError(f"{ann_file}: no usable instance annotations")
    self.ann_ids = ids

  def __getitem__(self, index: int) -> dict:
    ann, height, width, where = self._annotation(index)
    self._usable(ann, height, width)
    mask = masks_lib.annotation_mask(ann.get("segmentation"), height, width,
                                     where)
    x, y, w, h = ann["bbox"]
    box = np.array([x, y, x + w, y + h], np.float32)
    crop = crop_masks(mask[None], box[None], self.mask_size)[0]
    return {"mask": crop, "box": box, "image_id": np.int64(ann["image_id"]),
            "ann_id": np.int64(ann["id"]), "_origin": where}

  def __repr__(self) -> str:
    return f"CocoMaskSource({self.ann_file!r}, {len(self)} masks)"


class CocoMaskEvalSource(_CocoAnnotationSource):
  """Every annotation's mask as the reference evaluates the instance-mask tokenizer.

  The reference rounds the box to integers (`x1, y1, x2, y2`, Python `round`), crops
  the full mask there, resizes it to `mask_size` with OpenCV's bilinear kernel, and
  later pastes the reconstruction back into that box (`ait_jax.evaluation.
  mask_tokenizer`); annotations whose box is under 2 px on a side get no
  reconstruction, and crowd annotations are included. Boxes are clipped to the image
  here (the reference would fail on one that leaves it).

  Records: `mask` uint8 (S, S) in {0, 1} (zeros without a crop), `box` int32 (4,),
  `has_crop` bool, `label` int32 (contiguous class), `image_id`, `ann_id` int64,
  `image_size` int32 (height, width).
  """

  def __init__(self, ann_file: str, *, mask_size: int = 64):
    super().__init__(ann_file)
    self.mask_size = mask_size
    self.ann_ids = [a["id"] for a in self.coco.anns.values()
                    if a["image_id"] in self.coco.imgs]
    if not self.ann_ids:
      raise DataError(f"{ann_file}: no instance annotations")

  def __getitem__(self, index: int) -> dict:
    ann, height, width, where = self._annotation(index)
    if ann["category_id"] not in self.cat_to_label:
      raise DataError(f"{where}: category {ann['category_id']} is not in the "
                      "categories")
    x, y, w, h = (float(v) for v in self._box(ann))
    x1, x2 = (min(max(round(v), 0), width) for v in (x, x + w))
    y1, y2 = (min(max(round(v), 0), height) for v in (y, y + h))
    s = self.mask_size
    has_crop = x2 - x1 >= 2 and y2 - y1 >= 2
    if has_crop:
      full = masks_lib.annotation_mask(ann.get("segmentation"), height, width, where)
      crop = resize.resize_bilinear(np.ascontiguousarray(full[y1:y2, x1:x2]), s, s)
    else:
      crop = np.zeros((s, s), np.uint8)
    return {"mask": crop, "box": np.array([x1, y1, x2, y2], np.int32),
            "has_crop": np.bool_(has_crop),
            "label": np.int32(self.cat_to_label[ann["category_id"]]),
            "image_id": np.int64(ann["image_id"]), "ann_id": np.int64(ann["id"]),
            "image_size": np.array([height, width], np.int32), "_origin": where}

  def __repr__(self) -> str:
    return f"CocoMaskEvalSource({self.ann_file!r}, {len(self)} annotations)"
