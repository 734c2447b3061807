"""Instance masks: COCO annotation decoding with validation.

Box crops of masks (the reference's `crop_and_resize_gpu`) are
`ait_jax.tasks.masks.crop_masks`, shared with the instance-segmentation task.
"""

from typing import Any
import warnings

import numpy as np
from pycocotools import mask as mask_utils

from input_pipeline.errors import DataError


# pycocotools' RLE objects predate numpy 2's `__array__(copy=...)`; the
# warning numpy raises for them on every decode says nothing about the data.
warnings.filterwarnings("ignore", message="__array__ implementation doesn't",
                        category=DeprecationWarning, module="pycocotools")


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
