"""COCO annotation masks: decoding and validation."""

import numpy as np
import pytest

from input_pipeline import masks
from input_pipeline.errors import DataError

# pycocotools objects trigger a numpy 2 DeprecationWarning on every decode.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning")


def test_polygon_and_rle_decode():
  square = masks.annotation_mask([[1, 1, 4, 1, 4, 3, 1, 3]], 5, 6, "a")
  expected = np.zeros((5, 6), np.uint8)
  expected[1:3, 1:4] = 1
  np.testing.assert_array_equal(square, expected)
  # Uncompressed (column-major) RLE of the same mask.
  flat = expected.flatten(order="F")
  counts, value, run = [], 0, 0
  for v in flat:
    if v == value:
      run += 1
    else:
      counts.append(run)
      value, run = v, 1
  counts.append(run)
  rle = masks.annotation_mask({"size": [5, 6], "counts": counts}, 5, 6, "a")
  np.testing.assert_array_equal(rle, expected)


@pytest.mark.parametrize("segmentation, message", [
    ([], "empty polygon list"),
    ([[1, 1, 3, 3]], "degenerate polygon with 4"),
    ([[1, 1, 3, 3, 4]], "degenerate polygon with 5"),
    ([[1, 1, float("nan"), 3, 4, 4]], "non-finite"),
    ({"size": [4, 4], "counts": [16]}, "RLE size"),
    ({"size": [5, 6], "counts": [10]}, "sum to 10"),
    ({"size": [5, 6], "counts": [30]}, "mask is empty"),
    ("not a mask", "neither polygons nor RLE"),
])
def test_bad_annotation_masks_raise_naming_the_annotation(segmentation, message):
  with pytest.raises(DataError, match=message) as info:
    masks.annotation_mask(segmentation, 5, 6, "ann.json annotation 7")
  assert str(info.value).startswith("ann.json annotation 7")
