"""Closed-form checks of the input transforms (depth, insseg, colour, resize)."""

import math

import numpy as np
import pytest

from input_pipeline import color
from input_pipeline import resize
from input_pipeline import transforms_depth as td
from input_pipeline import transforms_insseg as ti


class _FixedRng:
  """A generator stand-in returning prescribed draws (in call order)."""

  def __init__(self, *values):
    self.values = list(values)

  def random(self):
    return self.values.pop(0)

  def uniform(self, low=0.0, high=1.0):
    return low + (high - low) * self.values.pop(0)

  def integers(self, low, high):
    return low + int(self.values.pop(0) * (high - low))

  def permutation(self, n):
    return np.random.default_rng(0).permutation(n)


def _coordinate_record(h=12, w=16):
  """Image and depth whose values encode their own pixel coordinates."""
  yy, xx = np.mgrid[:h, :w]
  image = np.stack([yy, xx, np.zeros_like(yy)], -1).astype(np.uint8)
  return {"image": image, "depth": (xx + 100 * yy).astype(np.float32),
          "_position": 0}


# --- resize kernels ---------------------------------------------------------


def test_bilinear_upsample_ramp_matches_opencv_formula():
  # 1x2 -> 1x4: source x = (dx + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25,
  # clamped at the edges: 0, 0.25 * 255, 0.75 * 255, 255, rounded.
  image = np.array([[[0], [255]]], np.uint8)
  out = resize.resize_bilinear(image, 1, 4)
  np.testing.assert_array_equal(out[0, :, 0], [0, 64, 191, 255])


def test_bilinear_constant_and_window():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
  full = resize.resize_bilinear(image, 20, 25)
  np.testing.assert_array_equal(
      resize.resize_bilinear(image, 20, 25, (3, 17, 5, 21)), full[3:17, 5:21])
  const = np.full((5, 6, 3), 77, np.uint8)
  assert (resize.resize_bilinear(const, 13, 3) == 77).all()


def test_halving_is_opencv_area_fast_path():
  # OpenCV turns INTER_LINEAR into INTER_AREA for an exact 2x shrink on both axes:
  # each output is its 2x2 block's mean, uint8 rounded half up.
  image = np.array([[0, 1, 4, 4], [1, 0, 4, 5], [9, 9, 0, 0], [9, 9, 0, 1]], np.uint8)
  np.testing.assert_array_equal(resize.resize_bilinear(image, 2, 2), [[1, 4], [9, 0]])
  np.testing.assert_array_equal(resize.resize_bilinear(image, 2, 2, (1, 2, 0, 2)),
                                [[9, 0]])
  np.testing.assert_allclose(resize.resize_bilinear_float(image.astype(np.float32), 2, 2),
                             [[0.5, 4.25], [9, 0.25]])


def test_float_bilinear_matches_opencv_formula():
  # 2x2 -> 4x4: taps at -0.25, 0.25, 0.75, 1.25 clamp to weights 0, .25, .75, 1.
  ramp = np.array([[0, 1], [2, 3]], np.float32)
  weights = np.array([0, 0.25, 0.75, 1], np.float32)
  want = 2 * weights[:, None] + weights[None, :]
  np.testing.assert_allclose(resize.resize_bilinear_float(ramp, 4, 4), want, atol=1e-7)
  # Shrinking a linear ramp 6x10 -> 4x4 samples it at the half-pixel centres.
  grid = np.arange(6, dtype=np.float32)[:, None] * 10 + np.arange(10)[None, :]
  out = resize.resize_bilinear_float(grid, 4, 4)
  rows, cols = (np.arange(4) + 0.5) * 1.5 - 0.5, (np.arange(4) + 0.5) * 2.5 - 0.5
  np.testing.assert_allclose(out, rows[:, None] * 10 + cols[None, :], atol=1e-5)


def test_nearest_is_opencv_floor_rule():
  np.testing.assert_array_equal(resize.nearest_indices(4, 8, 0, 8),
                                [0, 0, 1, 1, 2, 2, 3, 3])
  np.testing.assert_array_equal(resize.nearest_indices(8, 3, 0, 3), [0, 2, 5])


def test_rescale_size_fits_long_and_short_edges():
  assert resize.rescale_size(40, 60, (64, 64)) == (43, 64)
  assert resize.rescale_size(480, 640, (640, 640)) == (480, 640)
  assert resize.rescale_size(480, 640, (1920, 1920)) == (1440, 1920)


# --- colour -----------------------------------------------------------------


def test_brightness_contrast_lut():
  image = np.array([[[100, 250, 0]]], np.uint8)
  out = color.brightness_contrast(image, alpha=1.1, beta=0.1)
  # 100 * 1.1 + 25.5 = 135.5 -> 135; 250 * 1.1 + 25.5 -> 255 (clip); 0 -> 25.
  np.testing.assert_array_equal(out[0, 0], [135, 255, 25])


def test_gamma_lut():
  image = np.array([[[64, 200, 0]]], np.uint8)
  out = color.gamma(image, 0.5)
  expected = [int((v / 255) ** 0.5 * 255) for v in (64, 200, 0)]
  np.testing.assert_array_equal(out[0, 0], expected)


def test_hsv_of_primaries_and_hue_shift():
  rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]]],
                 np.uint8)
  hsv = color.rgb_to_hsv(rgb)
  np.testing.assert_array_equal(
      hsv[0], [[0, 255, 255], [60, 255, 255], [120, 255, 255], [0, 0, 128]])
  np.testing.assert_array_equal(color.hsv_to_rgb(hsv), rgb)
  # +60 in OpenCV hue units is +120 degrees: red -> green, green -> blue.
  shifted = color.shift_hsv(rgb[:, :2], 60, 0, 0)
  np.testing.assert_array_equal(shifted[0], [[0, 255, 0], [0, 0, 255]])
  # Value shift on grey.
  np.testing.assert_array_equal(color.shift_hsv(rgb[:, 3:], 0, 0, 20)[0, 0],
                                [148, 148, 148])


# --- depth transforms ---------------------------------------------------------


def test_depth_flip_moves_depth_with_image():
  record = _coordinate_record()
  out = td.HorizontalFlip(p=1.0).random_map(record, np.random.default_rng(0))
  np.testing.assert_array_equal(out["image"], record["image"][:, ::-1])
  np.testing.assert_array_equal(out["depth"], record["depth"][:, ::-1])
  # Pixel (y, x) now shows column W - 1 - x, in image and depth alike.
  assert out["image"][3, 2, 1] == 13 and out["depth"][3, 2] == 313


def test_random_crop_offsets_follow_albumentations():
  record = _coordinate_record(12, 16)
  out = td.RandomCrop(8, 10).random_map(record, _FixedRng(0.5, 0.9))
  y0, x0 = int((12 - 8) * 0.5), int((16 - 10) * 0.9)  # 2, 5
  assert out["image"].shape == (8, 10, 3) and out["depth"].shape == (8, 10)
  assert out["image"][0, 0, 0] == y0 and out["image"][0, 0, 1] == x0
  assert out["depth"][0, 0] == x0 + 100 * y0


def test_depth_stripe_every_fourth_position():
  h, w = 6, 20
  record = {"image": np.zeros((h, w, 3), np.uint8),
            "depth": np.full((h, w), 2.5, np.float32)}
  stripe = td.DepthStripe()
  alpha, beta = 0.25, 0.5
  out = stripe.random_map({**record, "_position": 8}, _FixedRng(alpha, beta))
  left = int(alpha * w)
  span = int(max((w - alpha * w) * beta * 0.75, 1))
  expected = np.zeros((h, w, 3), np.uint8)
  expected[:, left:left + span] = 2500 % 256  # millimetres wrapped to uint8
  np.testing.assert_array_equal(out["image"], expected)
  untouched = stripe.random_map({**record, "_position": 9}, _FixedRng())
  assert (untouched["image"] == 0).all()


def test_depth_resize_keeps_measured_values():
  depth = np.arange(16, dtype=np.float32).reshape(4, 4)
  out = td.Resize(8, 8).map({"image": np.zeros((4, 4, 3), np.uint8),
                             "depth": depth})
  assert out["depth"].shape == (8, 8)
  assert out["depth"][5, 3] == depth[2, 1]  # floor(5 / 2), floor(3 / 2)


def test_mask_patches_mask_input_keep_target():
  depth = np.random.default_rng(0).uniform(1, 5, (32, 48)).astype(np.float32)
  out = td.MaskPatches(0.5, 16).random_map({"depth": depth},
                                           np.random.default_rng(1))
  np.testing.assert_array_equal(out["depth"], depth)
  masked = out["masked_depth"]
  cells = (masked.reshape(2, 16, 3, 16) == 0).all(axis=(1, 3))
  assert cells.sum() == math.ceil(6 * 0.5)
  kept = np.repeat(np.repeat(~cells, 16, 0), 16, 1)
  np.testing.assert_array_equal(masked, depth * kept)


def test_to_float_scales_image_and_adds_depth_channel():
  out = td.ToFloat().map({"image": np.full((2, 3, 3), 255, np.uint8),
                          "depth": np.ones((2, 3), np.float32)})
  assert out["image"].dtype == np.float32 and (out["image"] == 1).all()
  assert out["depth"].shape == (2, 3, 1)


def test_boundary_crop_is_fixed_box():
  record = _coordinate_record(12, 16)
  out = td.Crop(3, 1, 13, 11).map(record)
  assert out["depth"].shape == (10, 10) and out["depth"][0, 0] == 3 + 100


# --- instance segmentation transforms --------------------------------------------


def _instance_record(h=40, w=60):
  """Two rectangle instances with boxes equal to their masks' extents."""
  masks = np.zeros((2, h, w), np.uint8)
  masks[0, 5:25, 10:30] = 1
  masks[1, 30:38, 40:58] = 1
  return {"image": np.full((h, w, 3), 90, np.uint8),
          "boxes": np.array([[10, 5, 30, 25], [40, 30, 58, 38]], np.float32),
          "labels": np.array([3, 7], np.int32), "masks": masks,
          "crowd": np.array([False, True])}


def test_drop_crowd():
  out = ti.DropCrowd().map(_instance_record())
  np.testing.assert_array_equal(out["labels"], [3])
  assert out["masks"].shape[0] == 1 and "crowd" not in out


def test_lsj_resize_without_crop_scales_boxes_and_masks():
  record = ti.DropCrowd().map(_instance_record())
  lsj = ti.LargeScaleJitter((64, 64), ratio_range=(1.0, 1.0))
  out = lsj.random_map(record, _FixedRng(0.3, 0.0, 0.0))
  # Scale (64, 64) fits 40x60 into 43x64; 43x64 fits the 64x64 crop.
  assert out["image"].shape == (43, 64, 3)
  sx, sy = 64 / 60, 43 / 40
  np.testing.assert_allclose(out["boxes"][0], [10 * sx, 5 * sy, 30 * sx,
                                               25 * sy], rtol=1e-6)
  rows = np.nonzero(out["masks"][0].any(1))[0]
  cols = np.nonzero(out["masks"][0].any(0))[0]
  # Nearest: floor(y * 40 / 43) in [5, 25) -> y in [6, 26];
  # floor(x * 60 / 64) in [10, 30) -> x in [11, 31].
  assert (rows.min(), rows.max()) == (6, 26)
  assert (cols.min(), cols.max()) == (11, 31)


def test_lsj_crop_shifts_clips_and_drops_instances():
  record = ti.DropCrowd().map(_instance_record())
  record = {**record, "boxes": np.concatenate([record["boxes"],
                                               [[50, 30, 58, 38]]]),
            "labels": np.array([3, 9], np.int32),
            "masks": np.concatenate([record["masks"],
                                     _instance_record()["masks"][1:]])}
  # ratio 2: scale (128, 128) fits 40x60 into 85x128; crop 64x64 at (21, 40).
  lsj = ti.LargeScaleJitter((64, 64), ratio_range=(2.0, 2.0))
  out = lsj.random_map(record, _FixedRng(0.0, 21 / 22, 40 / 65))
  assert out["image"].shape == (64, 64, 3)
  sx, sy = 128 / 60, 85 / 40
  expected = np.array([10 * sx - 40, 5 * sy - 21, 30 * sx - 40, 25 * sy - 21])
  expected = np.clip(expected, 0, 64)
  np.testing.assert_allclose(out["boxes"], [expected], rtol=1e-5)
  np.testing.assert_array_equal(out["labels"], [3])  # x1 = 106.7 - 40 > 64
  assert out["masks"].shape == (1, 64, 64)
  cols = np.nonzero(out["masks"][0].any(0))[0]
  assert cols.min() == 0 and cols.max() == 23  # floor((x+40)*60/128) < 30


def test_lsj_then_flip_keeps_boxes_on_masks():
  rng = np.random.default_rng(3)
  record = ti.DropCrowd().map(_instance_record())
  for _ in range(20):
    out = ti.LargeScaleJitter((64, 64)).random_map(record, rng)
    out = ti.RandomFlip(p=0.5).random_map(out, rng)
    for box, mask in zip(out["boxes"], out["masks"]):
      ys, xs = np.nonzero(mask)
      if ys.size == 0:
        continue
      tolerance = 1 + 3.0  # nearest rounding at up to 3x scale
      assert abs(xs.min() - box[0]) <= tolerance
      assert abs(xs.max() + 1 - box[2]) <= tolerance
      assert abs(ys.min() - box[1]) <= tolerance
      assert abs(ys.max() + 1 - box[3]) <= tolerance


def test_random_flip_box_formula():
  record = ti.DropCrowd().map(_instance_record())
  out = ti.RandomFlip(p=1.0).random_map(record, np.random.default_rng(0))
  np.testing.assert_array_equal(out["boxes"][0], [60 - 30, 5, 60 - 10, 25])
  np.testing.assert_array_equal(out["masks"][0], record["masks"][0][:, ::-1])


def test_filter_small_boxes():
  record = {"boxes": np.array([[0, 0, 0.005, 5], [0, 0, 2, 2]], np.float32),
            "labels": np.array([1, 2], np.int32),
            "masks": np.zeros((2, 4, 4), np.uint8)}
  out = ti.FilterSmallBoxes().map(record)
  np.testing.assert_array_equal(out["labels"], [2])


def test_normalize_and_pad():
  image = np.zeros((30, 40, 3), np.uint8)
  image[0, 0] = [124, 116, 104]
  image[1, 1] = 255
  out = ti.Normalize().map({"image": image})
  mean, std = np.array(ti.IMAGENET_MEAN), np.array(ti.IMAGENET_STD)
  np.testing.assert_allclose(out["image"][0, 0], ([124, 116, 104] - mean) / std,
                             rtol=1e-5)
  np.testing.assert_allclose(out["image"][1, 1], (255 - mean) / std, rtol=1e-5)
  padded = ti.Pad((64, 64)).map({**out, "masks": np.ones((1, 30, 40),
                                                        np.uint8)})
  assert padded["image"].shape == (64, 64, 3)
  np.testing.assert_array_equal(padded["img_shape"], [30, 40])
  assert (padded["image"][30:] == 0).all() and (padded["image"][:, 40:] == 0).all()
  assert padded["masks"].sum() == 30 * 40


def test_mask_crops_of_rectangles_in_their_boxes_are_full():
  record = ti.DropCrowd().map(_instance_record())
  out = ti.MaskCrops(16).map(ti.Pad((64, 64)).map(record))
  assert out["mask_crops"].shape == (1, 16, 16) and (out["mask_crops"] == 1).all()


def test_pad_instances_and_cut_report():
  record = ti.DropCrowd().map(_instance_record())
  out = ti.PadInstances(4, keep_masks=True).map(record)
  np.testing.assert_array_equal(out["labels"], [3, -1, -1, -1])
  assert out["num_instances"] == 1 and out["masks"].shape == (4, 40, 60)
  cut = ti.PadInstances(1).map({**_instance_record(), "_origin": "x.jpg"})
  assert cut["num_instances"] == 1 and "masks" not in cut
  assert "x.jpg: 1 instances beyond" in cut["_skipped"][0]


def test_test_resize_records_scale():
  out = ti.TestResize((64, 64)).map({"image": np.zeros((40, 60, 3), np.uint8)})
  assert out["image"].shape == (43, 64, 3)
  np.testing.assert_array_equal(out["ori_shape"], [40, 60])
  np.testing.assert_allclose(out["scale_factor"], [64 / 60, 43 / 40] * 2)


def test_insseg_train_ops_end_to_end_shapes():
  from input_pipeline.transforms_common import Compose
  ops = ti.insseg_train_ops((64, 64), max_instances=5, mask_crop_size=8)
  out = Compose(ops).random_map(_instance_record(), np.random.default_rng(0))
  assert out["image"].shape == (64, 64, 3) and out["image"].dtype == np.float32
  assert out["boxes"].shape == (5, 4) and out["mask_crops"].shape == (5, 8, 8)
  n = int(out["num_instances"])
  assert (out["labels"][:n] == 3).all() and (out["labels"][n:] == -1).all()


def test_compose_rejects_non_grain_ops():
  from input_pipeline.transforms_common import Compose
  with pytest.raises(TypeError):
    Compose([lambda x: x])
