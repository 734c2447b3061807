"""roi_align / crop_and_resize (against the reference fixtures) and COCO masks."""

import numpy as np
import pytest

from input_pipeline import masks
from input_pipeline.errors import DataError
from tests.fixture_io import kind_fixtures

# pycocotools objects trigger a numpy 2 DeprecationWarning on every decode.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning")


def _insseg_fixtures():
  return [fx for fx in kind_fixtures() if fx.kind == "insseg_head"]


@pytest.mark.parametrize("fx", _insseg_fixtures(), ids=lambda fx: fx.name)
def test_roi_align_is_bit_identical_to_reference(fx):
  io = fx.io
  images = sorted({k.split(".")[1] for k in io if k.startswith("crop.img")})
  assert images
  for img in images:
    want = io[f"crop.{img}.roi_align"]
    size = want.shape[-1]
    got = masks.roi_align(io[f"gt.{img}.masks"], io[f"gt.{img}.bboxes"], size)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        masks.crop_and_resize(io[f"gt.{img}.masks"], io[f"gt.{img}.bboxes"],
                              size), io[f"crop.{img}.mask"])


def test_roi_align_averages_whole_pixels_on_integer_grid():
  # A 16x16 box over a map whose left half is 1: aligned samples fall on pixel
  # centres 4*pw + ix, so 4 output columns average 4 whole pixels each.
  m = np.zeros((1, 16, 16), np.uint8)
  m[0, :, :8] = 1
  out = masks.roi_align(m, np.array([[0, 0, 16, 16]]), 4)
  np.testing.assert_array_equal(out[0], np.tile([1, 1, 0, 0], (4, 1)))


def test_roi_align_outside_map_is_zero_and_zero_box():
  m = np.ones((1, 8, 8), np.uint8)
  out = masks.roi_align(m, np.array([[20, 20, 30, 30]]), 2)
  assert (out == 0).all()
  assert (masks.roi_align(m, np.array([[3, 3, 3, 3]]), 2) == 0).all()
  with pytest.raises(ValueError, match="negative size"):
    masks.roi_align(m, np.array([[5, 0, 3, 4]]), 2)


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
