"""Every task loader on synthetic data in the real formats: keys, shapes, geometry."""

import os

import numpy as np
import pytest

import input_pipeline as ip
from input_pipeline import synthetic

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return synthetic.generate(str(tmp_path_factory.mktemp("data")), num_train=6,
                            num_test=3, height=48, width=64)


def _options(**kw):
  return ip.LoaderOptions(process_index=0, process_count=1, **kw)


def _coco(data, split):
  return ip.CocoInstancesSource(
      os.path.join(data["coco"], "annotations", f"instances_{split}.json"),
      os.path.join(data["coco"], split), train=split == "train2017")


def test_insseg_training_batch(data):
  loader = ip.make_insseg_loader(
      _coco(data, "train2017"), train=True, image_size=(64, 64),
      max_instances=8, mask_crop_size=16, keep_masks=True,
      options=_options(global_batch_size=3, seed=2))
  for _ in range(4):
    batch = next(loader)
    assert batch["image"].shape == (3, 64, 64, 3)
    assert batch["boxes"].shape == (3, 8, 4) and batch["labels"].shape == (3, 8)
    assert batch["masks"].shape == (3, 8, 64, 64)
    assert batch["mask_crops"].shape == (3, 8, 16, 16)
    for b in range(3):
      n = batch["num_instances"][b]
      h, w = batch["img_shape"][b]
      assert (batch["image"][b, h:] == 0).all()
      assert (batch["image"][b, :, w:] == 0).all()
      assert set(batch["labels"][b, :n]) <= {0, 1, 2}
      assert (batch["labels"][b, n:] == -1).all()
      boxes = batch["boxes"][b, :n]
      assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
      for box, mask in zip(boxes, batch["masks"][b, :n]):
        ys, xs = np.nonzero(mask)
        if ys.size:  # the mask lies in its box (nearest rounding: 3 px at 3x)
          assert xs.min() >= box[0] - 4 and xs.max() + 1 <= box[2] + 4
          assert ys.min() >= box[1] - 4 and ys.max() + 1 <= box[3] + 4
  assert loader.num_skipped == 0


def test_insseg_evaluation_batch(data):
  loader = ip.make_insseg_loader(_coco(data, "val2017"), train=False,
                                 image_size=(64, 64),
                                 options=_options(global_batch_size=2))
  batches = list(loader)
  assert len(batches) == 2
  assert set(batches[0]) == {"image", "image_id", "img_shape", "ori_shape",
                             "scale_factor", "valid"}
  np.testing.assert_array_equal(batches[0]["img_shape"][0], [48, 64])
  np.testing.assert_array_equal(batches[0]["ori_shape"][0], [48, 64])
  np.testing.assert_array_equal(
      np.concatenate([b["image_id"] for b in batches]), [1, 2, 3, 1])
  np.testing.assert_array_equal(
      np.concatenate([b["valid"] for b in batches]), [True, True, True, False])


def test_mask_tokenizer_batch(data):
  ann = os.path.join(data["coco"], "annotations", "instances_train2017.json")
  source = ip.CocoMaskSource(ann, mask_size=16)
  loader = ip.make_mask_tokenizer_loader(source, train=True,
                                         options=_options(global_batch_size=4))
  batch = next(loader)
  assert batch["mask"].shape == (4, 16, 16, 1)
  assert set(np.unique(batch["mask"])) <= {0.0, 1.0}
  assert batch["mask"].mean() > 0.3  # masks fill much of their own boxes


def test_depth_tokenizer_batches(data):
  source = ip.NyuDepthSource(data["nyu"], load_image=False)
  loader = ip.make_depth_tokenizer_loader(
      source, train=True, crop_size=(32, 32), boundary_crop=(4, 0, 60, 48),
      mask_ratio=0.5, mask_patch=8, options=_options(global_batch_size=2))
  batch = next(loader)
  assert set(batch) == {"depth", "masked_depth"}
  masked = batch["masked_depth"] == 0
  assert masked.mean() == pytest.approx(0.5)
  np.testing.assert_array_equal(batch["masked_depth"][~masked],
                                batch["depth"][~masked])
  test = ip.make_depth_tokenizer_loader(
      ip.NyuDepthSource(data["nyu"], "test", load_image=False), train=False,
      options=_options(global_batch_size=3))
  batch = next(test)
  assert batch["depth"].shape == (3, 48, 64, 1) and batch["valid"].all()


def test_depth_training_batch_resized_for_demos(data):
  loader = ip.make_depth_loader(
      ip.NyuDepthSource(data["nyu"]), train=True, resize_to=(24, 32),
      crop_size=(16, 16), options=_options(global_batch_size=2))
  batch = next(loader)
  assert batch["image"].shape == (2, 16, 16, 3)
  assert 0 <= batch["image"].min() and batch["image"].max() <= 1
  assert 0.3 < batch["depth"].min() and batch["depth"].max() < 10
