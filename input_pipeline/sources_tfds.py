"""TFDS sources (`tfds.data_source`, ArrayRecord; no TensorFlow needed).

TFDS `nyu_depth_v2` is a different preprocessing from the reference's BTS split
(47584 train / 654 validation frames, depth float16 in metres, 480x640); use it
when the BTS files are not at hand. `ait_nyu_depth_v2` (written by
`tfds_builders`) is the BTS split with uint16 millimetre depth; both are read
by `TfdsNyuDepthSource`. `TfdsCocoInstancesSource` reads `ait_coco_instances`
(TFDS's own `coco/2017` has no instance masks).
"""

import functools

import numpy as np
from pycocotools import mask as mask_utils

from input_pipeline.errors import DataError


class _TfdsReader:
  """Opens the TFDS split lazily in each process (pickles as its arguments)."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    self.name = name
    self.split = split
    self.data_dir = data_dir

  @functools.cached_property
  def _reader(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return tfds.data_source(self.name, split=self.split,
                            data_dir=self.data_dir)

  def __getstate__(self):
    state = dict(self.__dict__)
    state.pop("_reader", None)
    return state

  def __len__(self) -> int:
    return len(self._reader)

  def _origin(self, index: int) -> str:
    return f"tfds:{self.name}/{self.split}[{index}]"


class TfdsNyuDepthSource(_TfdsReader):
  """A TFDS NYU depth split as a grain random-access source.

  Records: `image` uint8 (H, W, 3), `depth` float32 (H, W) metres, `_origin`.
  """

  def __init__(self, split: str = "train", data_dir: str | None = None,
               name: str = "nyu_depth_v2"):
    super().__init__(name, split, data_dir)

  def __getitem__(self, index: int) -> dict:
    origin = self._origin(index)
    example = self._reader[index]
    image = np.asarray(example["image"])
    depth = np.asarray(example["depth"])
    if depth.ndim == 3 and depth.shape[-1] == 1:
      depth = depth[..., 0]
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise DataError(f"{origin}: expected a uint8 RGB image, got "
                      f"{image.dtype} {image.shape}")
    if depth.shape != image.shape[:2]:
      raise DataError(f"{origin}: depth {depth.shape} does not match image "
                      f"{image.shape[:2]}")
    if np.issubdtype(depth.dtype, np.integer):
      depth = depth.astype(np.float32) / np.float32(1000.0)
    else:
      depth = depth.astype(np.float32)
    if not np.isfinite(depth).all():
      raise DataError(f"{origin}: depth has non-finite values")
    return {"image": image, "depth": depth, "_origin": origin}

  def __repr__(self) -> str:
    return f"TfdsNyuDepthSource({self.name!r}, {self.split!r})"


class TfdsCocoInstancesSource(_TfdsReader):
  """`ait_coco_instances` with the records of `CocoInstancesSource`.

  Records: `image`, `image_id`, and unless `with_annotations=False`, `boxes`,
  `labels`, `crowd`, `masks` (decoded from the stored RLE).
  """

  def __init__(self, split: str = "train", data_dir: str | None = None,
               name: str = "ait_coco_instances",
               with_annotations: bool = True):
    super().__init__(name, split, data_dir)
    self.with_annotations = with_annotations

  def __getitem__(self, index: int) -> dict:
    origin = self._origin(index)
    example = self._reader[index]
    image = np.asarray(example["image"])
    record = {"image": image, "image_id": np.int64(example["image_id"]),
              "_origin": origin}
    if not self.with_annotations:
      return record
    objects = example["objects"]
    h, w = image.shape[:2]
    boxes = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
    if not np.isfinite(boxes).all():
      raise DataError(f"{origin}: non-finite boxes")
    masks = [mask_utils.decode({"size": [h, w], "counts": bytes(rle)})
             for rle in objects["mask"]]
    record.update({
        "boxes": boxes,
        "labels": np.asarray(objects["label"], np.int32).reshape(-1),
        "crowd": np.asarray(objects["is_crowd"], bool).reshape(-1),
        "masks": (np.stack(masks) if masks else np.zeros((0, h, w), np.uint8)),
    })
    return record

  def __repr__(self) -> str:
    return f"TfdsCocoInstancesSource({self.name!r}, {self.split!r})"
