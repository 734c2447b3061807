"""TFDS builders writing NYUv2 (BTS split) and COCO instances as ArrayRecord.

Preparing needs no TensorFlow: images are stored as their original encoded
files (TFDS copies a path's bytes), depth as zlib-compressed uint16
millimetres, instance masks as compressed COCO RLE strings. Read them back
with `TfdsNyuDepthSource(name='ait_nyu_depth_v2')` and
`TfdsCocoInstancesSource`.

  from input_pipeline import tfds_builders
  tfds_builders.prepare("ait_nyu_depth_v2", raw_dir="data/nyu_depth_v2",
                        data_dir="tfds_data")
  tfds_builders.prepare("ait_coco_instances", raw_dir="data/coco",
                        data_dir="tfds_data")

`raw_dir` is the layout `NyuDepthSource` reads (file lists at its top) or the
COCO layout (`annotations/instances_{train,val}2017.json`,
`{train,val}2017/`). The COCO train split keeps mmdet's training images (with
annotations, sides >= 32 px) and its usable annotations; validation keeps every
image. Annotations whose masks are bad are left out and logged.
"""

import logging
import os

import numpy as np
from pycocotools import mask as mask_utils
import tensorflow_datasets as tfds

from input_pipeline import sources_coco
from input_pipeline import sources_nyu
from input_pipeline.errors import DataError


class _ManualBuilder(tfds.core.GeneratorBasedBuilder):
  """Builders fed from a local directory (no downloads, so no checksums file).

  TFDS looks for a checksums file next to the builder's code, through a
  package (`importlib_resources`) not installed here; there is none to find.
  """

  MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the raw data directory as manual_dir."

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None


class AitNyuDepthV2(_ManualBuilder):
  """NYUv2, BTS split (24231 train / 654 test), depth in uint16 millimetres."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, disable_shuffling=True,  # records keep the source order
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3),
                                         encoding_format="jpeg"),
            "depth": tfds.features.Tensor(shape=(None, None), dtype=np.uint16,
                                          encoding="zlib"),
        }))

  def _split_generators(self, dl_manager):
    root = str(dl_manager.manual_dir)
    return {split: self._generate_examples(root, split)
            for split in ("train", "test")}

  def _generate_examples(self, root, split):
    source = sources_nyu.NyuDepthSource(root, split, load_image=False)
    for index, (rgb, _) in enumerate(source.pairs):
      record = source[index]
      millimetres = np.rint(record["depth"] * 1000).astype(np.uint16)
      yield index, {"image": os.path.join(source.data_root, rgb.lstrip("/")),
                    "depth": millimetres}


class AitCocoInstances(_ManualBuilder):
  """COCO 2017 instances with masks (RLE), boxes in pixels, mmdet labels."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, disable_shuffling=True,  # records keep the source order
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3),
                                         encoding_format="jpeg"),
            "image_id": tfds.features.Scalar(dtype=np.int64),
            "objects": tfds.features.Sequence({
                "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                "label": tfds.features.Scalar(dtype=np.int64),
                "is_crowd": tfds.features.Scalar(dtype=np.bool_),
                "mask": tfds.features.Text(),
            }),
        }))

  def _split_generators(self, dl_manager):
    root = str(dl_manager.manual_dir)
    return {"train": self._generate_examples(root, "train2017", True),
            "validation": self._generate_examples(root, "val2017", False)}

  def _generate_examples(self, root, split, train):
    source = sources_coco.CocoInstancesSource(
        os.path.join(root, "annotations", f"instances_{split}.json"),
        os.path.join(root, split), train=train, skip_bad_annotations=True)
    for index, image_id in enumerate(source.image_ids):
      info = source.coco.imgs[image_id]
      path = os.path.join(source.image_dir, info["file_name"])
      objects = {"bbox": np.zeros((0, 4), np.float32),
                 "label": np.zeros(0, np.int64),
                 "is_crowd": np.zeros(0, bool), "mask": []}
      anns = source.read_annotations(image_id, info["height"], info["width"],
                                     path)
      for reason in anns["_skipped"]:
        logging.warning("ait_coco_instances: left out %s", reason)
      if len(anns["labels"]):
        objects = {
            "bbox": anns["boxes"], "label": anns["labels"].astype(np.int64),
            "is_crowd": anns["crowd"],
            "mask": [mask_utils.encode(np.asfortranarray(m))["counts"].decode()
                     for m in anns["masks"]]}
      yield index, {"image": path, "image_id": image_id, "objects": objects}


def prepare(name: str, raw_dir: str, data_dir: str) -> None:
  """Builds `name` ('ait_nyu_depth_v2' or 'ait_coco_instances') into data_dir."""
  builders = {"ait_nyu_depth_v2": AitNyuDepthV2,
              "ait_coco_instances": AitCocoInstances}
  if name not in builders:
    raise ValueError(f"unknown dataset {name!r}; one of {sorted(builders)}")
  if not os.path.isdir(raw_dir):
    raise DataError(f"{raw_dir}: raw data directory not found")
  builder = builders[name](data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=raw_dir))
