"""Bad data: a clear error naming the file, or a counted and reported skip."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import input_pipeline as ip
from input_pipeline import synthetic
from input_pipeline.errors import DataError

# pycocotools objects trigger a numpy 2 DeprecationWarning on every decode.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("pristine"))
  synthetic.generate(out, num_train=6, num_test=2, height=48, width=64)
  return out


@pytest.fixture
def data(pristine, tmp_path):
  out = str(tmp_path / "data")
  shutil.copytree(pristine, out)
  return out


def _options(**kw):
  return ip.LoaderOptions(process_index=0, process_count=1, **kw)


def _nyu_paths(data, index=0):
  root = os.path.join(data, "nyu_depth_v2")
  rgb, depth = open(os.path.join(root, "train_list.txt")).readlines()[
      index].split()[:2]
  return root, root + rgb, root + depth


def _depth_loader(root, **kw):
  return ip.make_depth_loader(
      ip.NyuDepthSource(root), train=True, crop_size=(32, 32),
      options=_options(global_batch_size=6, num_epochs=1, **kw))


def _coco(data, split="train2017"):
  root = os.path.join(data, "coco")
  return (os.path.join(root, "annotations", f"instances_{split}.json"),
          os.path.join(root, split))


def _edit_annotations(ann_file, edit):
  content = json.load(open(ann_file))
  edit(content)
  json.dump(content, open(ann_file, "w"))
  return content


def test_missing_image_raises_naming_it(data):
  root, rgb, _ = _nyu_paths(data)
  os.remove(rgb)
  with pytest.raises(DataError, match=f"{rgb}: file not found"):
    next(_depth_loader(root))


def test_missing_image_is_skipped_counted_and_reported(data):
  root, rgb, _ = _nyu_paths(data, 2)
  os.remove(rgb)
  loader = _depth_loader(root, skip_bad_records=True)
  batch = next(loader)
  assert batch["image"].shape[0] == 6  # replaced, not a short batch
  assert loader.num_skipped == 1 and rgb in loader.skipped[0]
  assert loader.get_state()["skipped"] == 1


def test_missing_file_error_crosses_worker_processes(data):
  root, rgb, _ = _nyu_paths(data)
  os.remove(rgb)
  with _depth_loader(root, worker_count=1) as loader:
    with pytest.raises(Exception, match="file not found") as info:
      next(loader)
  assert rgb in str(info.value)


def test_corrupt_and_truncated_images_raise_naming_them(data):
  root, rgb, _ = _nyu_paths(data, 0)
  with open(rgb, "wb") as f:
    f.write(b"this is not a jpeg")
  source = ip.NyuDepthSource(root)
  with pytest.raises(DataError, match="cannot decode image") as info:
    source[0]
  assert str(info.value).startswith(rgb)
  _, rgb1, _ = _nyu_paths(data, 1)
  content = open(rgb1, "rb").read()
  with open(rgb1, "wb") as f:
    f.write(content[:len(content) // 2])
  with pytest.raises(DataError, match=f"{rgb1}: cannot decode image"):
    source[1]


def test_depth_png_of_wrong_size_or_depth_raises_naming_it(data):
  root, _, depth = _nyu_paths(data)
  Image.fromarray(np.zeros((10, 10), np.uint16)).save(depth)
  with pytest.raises(DataError, match="depth is 10x10 but its image") as info:
    ip.NyuDepthSource(root)[0]
  assert str(info.value).startswith(depth)
  Image.fromarray(np.zeros((48, 64), np.uint8)).save(depth)
  with pytest.raises(DataError, match=f"{depth}: expected a single-channel "
                     "16-bit"):
    ip.NyuDepthSource(root)[0]


def test_nan_after_reading_raises_or_is_skipped():
  class NanDepth:
    def __len__(self):
      return 4

    def __getitem__(self, i):
      depth = np.ones((8, 8), np.float32)
      if i == 1:
        depth[3, 3] = np.nan
      return {"image": np.zeros((8, 8, 3), np.uint8), "depth": depth,
              "_origin": f"frame{i}.png"}

  def loader(**kw):
    return ip.make_depth_loader(NanDepth(), train=False,
                                options=_options(global_batch_size=4, **kw))

  with pytest.raises(DataError, match="frame1.png: non-finite values in 'depth'"):
    next(loader())
  skipping = loader(skip_bad_records=True)
  batch = next(skipping)
  np.testing.assert_array_equal(batch["valid"], [True, False, True, True])
  assert np.isfinite(batch["depth"]).all() and skipping.num_skipped == 1


@pytest.mark.parametrize("segmentation, message", [
    ([[1.0, 2.0, 5.0, 6.0]], "degenerate polygon"),
    ({"size": [48, 64], "counts": [48 * 64]}, "mask is empty"),
    ({"size": [10, 10], "counts": [100]}, "RLE size"),
])
def test_bad_annotation_raises_or_is_skipped(data, segmentation, message):
  ann_file, image_dir = _coco(data)

  def corrupt(content):
    content["annotations"][0]["segmentation"] = segmentation
    content["annotations"][0]["iscrowd"] = 0
  content = _edit_annotations(ann_file, corrupt)
  bad = content["annotations"][0]
  index = [im["id"] for im in content["images"]].index(bad["image_id"])
  source = ip.CocoInstancesSource(ann_file, image_dir)
  with pytest.raises(DataError, match=message) as info:
    source[index]
  assert f"annotation {bad['id']}" in str(info.value)
  assert ann_file in str(info.value) and image_dir in str(info.value)

  skipping = ip.CocoInstancesSource(ann_file, image_dir,
                                    skip_bad_annotations=True)
  good = source.coco.getAnnIds(imgIds=bad["image_id"])
  assert len(skipping[index]["labels"]) == len(good) - 1
  loader = ip.make_insseg_loader(skipping, train=True, image_size=(64, 64),
                                 options=_options(global_batch_size=6,
                                                  num_epochs=1))
  next(loader)
  assert loader.num_skipped == 1 and message in loader.skipped[0]


def test_nan_box_and_image_size_mismatch(data):
  ann_file, image_dir = _coco(data)

  def corrupt(content):
    content["annotations"][0]["bbox"][2] = float("nan")
    content["images"][1]["height"] = 50
  content = _edit_annotations(ann_file, corrupt)
  source = ip.CocoInstancesSource(ann_file, image_dir)
  ids = [im["id"] for im in content["images"]]
  with pytest.raises(DataError, match="not 4 finite numbers"):
    source[ids.index(content["annotations"][0]["image_id"])]
  with pytest.raises(DataError, match="image is 48x64 but .* says 50x64"):
    source[1]
  masks = ip.CocoMaskSource(ann_file)
  with pytest.raises(DataError, match="not 4 finite numbers"):
    masks[masks.ann_ids.index(content["annotations"][0]["id"])]
  evaluation = ip.CocoMaskEvalSource(ann_file)
  where = f"annotation {content['annotations'][0]['id']}: bbox .* not 4 finite numbers"
  with pytest.raises(DataError, match=where):
    evaluation[evaluation.ann_ids.index(content["annotations"][0]["id"])]


def test_mask_eval_source_names_bad_annotations(data):
  ann_file, _ = _coco(data)

  def corrupt(content):
    content["annotations"][0]["category_id"] = 999
    content["annotations"][1]["segmentation"] = []
  content = _edit_annotations(ann_file, corrupt)
  source = ip.CocoMaskEvalSource(ann_file)
  first, second = (source.ann_ids.index(a["id"]) for a in content["annotations"][:2])
  with pytest.raises(DataError, match="category 999 is not in the categories"):
    source[first]
  with pytest.raises(DataError, match="empty polygon list"):
    source[second]


def test_missing_list_and_annotation_files(tmp_path):
  with pytest.raises(DataError, match="file list not found"):
    ip.NyuDepthSource(str(tmp_path))
  with pytest.raises(DataError, match="annotation file not found"):
    ip.CocoInstancesSource(str(tmp_path / "x.json"), str(tmp_path))


def test_too_many_bad_records_in_a_row_is_an_error(data):
  root = os.path.join(data, "nyu_depth_v2")
  for index in range(6):
    os.remove(_nyu_paths(data, index)[1])
  with pytest.raises(DataError, match="bad records in a row"):
    next(_depth_loader(root, skip_bad_records=True, max_consecutive_bad=3))
