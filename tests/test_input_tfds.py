"""The TFDS NYU source on data TFDS itself produces (its mock data), no network."""

import numpy as np
import pytest

import input_pipeline as ip
from input_pipeline.errors import DataError

tfds = pytest.importorskip("tensorflow_datasets")

# pycocotools objects trigger a numpy 2 DeprecationWarning on every decode.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning")


def _options(**kw):
  return ip.LoaderOptions(process_index=0, process_count=1, **kw)


def test_tfds_mock_nyu_through_training_and_evaluation_loaders():
  with tfds.testing.mock_data(num_examples=5):
    source = ip.TfdsNyuDepthSource("train")
    assert len(source) == 5
    record = source[0]
    assert record["image"].dtype == np.uint8
    assert record["image"].shape == (480, 640, 3)
    assert record["depth"].dtype == np.float32
    assert record["depth"].shape == (480, 640)

    train = ip.make_depth_loader(source, train=True, crop_size=(480, 480),
                                 options=_options(global_batch_size=2))
    batch = next(train)
    assert batch["image"].shape == (2, 480, 480, 3)
    assert batch["depth"].shape == (2, 480, 480, 1)
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1

    test = ip.make_depth_loader(ip.TfdsNyuDepthSource("validation"),
                                train=False,
                                options=_options(global_batch_size=2))
    batches = list(test)
    assert len(batches) == 3  # 5 frames padded to 6
    np.testing.assert_array_equal(batches[-1]["valid"], [True, False])
    # The eval depth is the source's depth, unchanged.
    np.testing.assert_array_equal(batches[0]["depth"][0, ..., 0],
                                  ip.TfdsNyuDepthSource("validation")[0]["depth"])


def test_tfds_source_rejects_non_finite_depth(monkeypatch):
  with tfds.testing.mock_data(num_examples=2):
    source = ip.TfdsNyuDepthSource("train")
    example = dict(source._reader[0])  # pylint: disable=protected-access
    example["depth"] = np.full((480, 640), np.nan, np.float16)

    class Reader:
      def __len__(self):
        return 1

      def __getitem__(self, i):
        return example

    monkeypatch.setitem(source.__dict__, "_reader", Reader())
    with pytest.raises(DataError, match=r"tfds:nyu_depth_v2/train\[0\]: depth "
                       "has non-finite"):
      source[0]


def test_builders_write_what_the_file_sources_read(tmp_path):
  from input_pipeline import synthetic
  from input_pipeline import tfds_builders
  raw = synthetic.generate(str(tmp_path / "raw"), num_train=3, num_test=2,
                           height=40, width=56)
  data_dir = str(tmp_path / "tfds")
  tfds_builders.prepare("ait_nyu_depth_v2", raw["nyu"], data_dir)
  tfds_builders.prepare("ait_coco_instances", raw["coco"], data_dir)

  for split in ("train", "test"):
    files = ip.NyuDepthSource(raw["nyu"], split)
    stored = ip.TfdsNyuDepthSource(split, data_dir, name="ait_nyu_depth_v2")
    assert len(stored) == len(files)
    for i in range(len(files)):
      want, got = files[i], stored[i]
      np.testing.assert_array_equal(got["image"], want["image"])
      np.testing.assert_array_equal(got["depth"], want["depth"])

  coco = raw["coco"]
  files = ip.CocoInstancesSource(f"{coco}/annotations/instances_train2017.json",
                                 f"{coco}/train2017")
  stored = ip.TfdsCocoInstancesSource("train", data_dir)
  assert len(stored) == len(files)
  by_id = {int(stored[i]["image_id"]): stored[i] for i in range(len(stored))}
  for i in range(len(files)):
    want = files[i]
    got = by_id[int(want["image_id"])]
    for key in ("image", "boxes", "labels", "crowd", "masks"):
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert len(ip.TfdsCocoInstancesSource("validation", data_dir)) == 2
