"""Instance masks: COCO annotation decoding with validation, and box crops.

`crop_and_resize` is the reference's `crop_and_resize_gpu`
(code/model/detection/insseg_head.py): mmcv `roi_align` with `aligned=True`,
`sampling_ratio=0`, average pooling and `spatial_scale=1`, then `>= 0.5`. It is
written out in float32 in the order the mmcv CPU kernel computes it, so its
values are bit-identical to the kernel's (checked against the reference
fixtures in tests/test_input_masks.py).
"""

from typing import Any
import warnings

import numpy as np
from pycocotools import mask as mask_utils

from input_pipeline.errors import DataError

_F32 = np.float32

# pycocotools' RLE objects predate numpy 2's `__array__(copy=...)`; the
# warning numpy raises for them on every decode says nothing about the data.
warnings.filterwarnings("ignore", message="__array__ implementation doesn't",
                        category=DeprecationWarning, module="pycocotools")


def _axis_samples(start, bin_size, grid: int, index: int, out_size: int):
  """Sample coordinates of sub-sample `index` for every output cell, float32."""
  cells = np.arange(out_size, dtype=_F32)
  return (start + cells * bin_size) + (_F32(index + 0.5) * bin_size) / _F32(grid)


def _axis_weights(coord: np.ndarray, size: int):
  """Bilinear taps of one axis: (valid, low, high, l-weight, h-weight)."""
  valid = (coord >= -1) & (coord <= size)
  coord = np.where(coord <= 0, _F32(0), coord)
  low = coord.astype(np.int64)  # truncation, like the kernel's (int) cast
  at_edge = low >= size - 1
  low = np.where(at_edge, size - 1, low)
  high = np.where(at_edge, size - 1, low + 1)
  coord = np.where(at_edge, low.astype(_F32), coord)
  lw = coord - low.astype(_F32)
  hw = _F32(1) - lw
  return valid, low, high, lw, hw


def roi_align(maps: np.ndarray, boxes: np.ndarray, out_size: int) -> np.ndarray:
  """mmcv roi_align(aligned=True, sampling_ratio=0, avg) of maps[i] in boxes[i].

  Args:
    maps: (N, H, W) values (cast to float32).
    boxes: (N, 4) boxes `x1, y1, x2, y2` in pixels (cast to float32).
    out_size: side S of the square output.

  Returns:
    (N, S, S) float32.
  """
  maps = np.asarray(maps, _F32)
  boxes = np.asarray(boxes, _F32).reshape(-1, 4)
  n, height, width = maps.shape
  if boxes.shape[0] != n:
    raise ValueError(f"roi_align: {n} maps but {boxes.shape[0]} boxes")
  out = np.zeros((n, out_size, out_size), _F32)
  size = _F32(out_size)
  for i in range(n):
    x1, y1, x2, y2 = (b * _F32(1.0) - _F32(0.5) for b in boxes[i])
    roi_w, roi_h = x2 - x1, y2 - y1
    if roi_w < 0 or roi_h < 0:
      raise ValueError(f"roi_align: box {boxes[i].tolist()} has negative size")
    bin_w, bin_h = roi_w / size, roi_h / size
    grid_w = int(np.ceil(roi_w / size))
    grid_h = int(np.ceil(roi_h / size))
    acc = np.zeros((out_size, out_size), _F32)
    xs = [_axis_weights(_axis_samples(x1, bin_w, grid_w, ix, out_size), width)
          for ix in range(grid_w)]
    for iy in range(grid_h):
      vy, ylo, yhi, ly, hy = _axis_weights(
          _axis_samples(y1, bin_h, grid_h, iy, out_size), height)
      rows_lo, rows_hi = maps[i][ylo], maps[i][yhi]
      for vx, xlo, xhi, lx, hx in xs:
        valid = vy[:, None] & vx[None, :]
        w1 = hy[:, None] * hx[None, :]
        w2 = hy[:, None] * lx[None, :]
        w3 = ly[:, None] * hx[None, :]
        w4 = ly[:, None] * lx[None, :]
        value = (((w1 * rows_lo[:, xlo] + w2 * rows_lo[:, xhi])
                  + w3 * rows_hi[:, xlo]) + w4 * rows_hi[:, xhi])
        acc += np.where(valid, value, _F32(0))
    out[i] = acc / _F32(max(grid_h * grid_w, 1))
  return out


def crop_and_resize(masks: np.ndarray, boxes: np.ndarray,
                    out_size: int) -> np.ndarray:
  """Binary (N, S, S) float32 crops of masks[i] in boxes[i] (reference targets)."""
  return (roi_align(masks, boxes, out_size) >= 0.5).astype(_F32)


def annotation_mask(segmentation: Any, height: int, width: int,
                    where: str) -> np.ndarray:
  """Decode a COCO polygon list or RLE into a uint8 (H, W) mask, validating it.

  Raises DataError (naming `where`) for an empty or degenerate polygon, an RLE
  whose size is not the image's, non-finite coordinates, or an empty mask.
  """
  if isinstance(segmentation, list):
    if not segmentation:
      raise DataError(f"{where}: empty polygon list")
    for poly in segmentation:
      coords = np.asarray(poly, np.float64)
      if coords.ndim != 1 or coords.size < 6 or coords.size % 2:
        raise DataError(f"{where}: degenerate polygon with {coords.size} "
                        "coordinates (needs an even number >= 6)")
      if not np.isfinite(coords).all():
        raise DataError(f"{where}: polygon with non-finite coordinates")
    rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
  elif isinstance(segmentation, dict) and "counts" in segmentation:
    size = list(segmentation.get("size", []))
    if size != [height, width]:
      raise DataError(f"{where}: RLE size {size} is not the image size "
                      f"{[height, width]}")
    counts = segmentation["counts"]
    if isinstance(counts, list):
      if sum(counts) != height * width:
        raise DataError(f"{where}: RLE counts sum to {sum(counts)}, expected "
                        f"{height * width}")
      rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
      rle = dict(segmentation)
      if isinstance(counts, str):
        rle["counts"] = counts.encode("ascii")
  else:
    raise DataError(f"{where}: segmentation is neither polygons nor RLE")
  mask = mask_utils.decode(rle)
  if not mask.any():
    raise DataError(f"{where}: mask is empty")
  return mask
