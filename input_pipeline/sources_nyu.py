"""NYUv2 depth in the BTS layout that the reference reads (random access)."""

import os

import numpy as np

from input_pipeline import image_io
from input_pipeline.errors import DataError


def read_file_list(path: str) -> list[tuple[str, str]]:
  """`rgb depth [focal]` lines (paths relative to the data root, BTS format)."""
  if not os.path.exists(path):
    raise DataError(f"{path}: file list not found")
  pairs = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      fields = line.split()
      if not fields:
        continue
      if len(fields) < 2:
        raise DataError(f"{path}:{number}: expected 'rgb_path depth_path', got "
                        f"{line.strip()!r}")
      pairs.append((fields[0], fields[1]))
  if not pairs:
    raise DataError(f"{path}: file list is empty")
  return pairs


class NyuDepthSource:
  """NYUv2 (BTS split) as a grain random-access source.

  Layout (the reference's `nyudepthv2` dataset): `train_list.txt` lines
  `/scene/rgb_00045.jpg /scene/sync_depth_00045.png` relative to `root`;
  `test_list.txt` lines relative to `root/official_splits/test/`. Depth PNGs are
  16-bit millimetres; records carry depth in metres (`/ 1000`, as the
  reference). The reference's own list files live in its
  `code/dataset/depth/filenames/nyudepthv2/`; pass one as `list_file`.

  Records: `image` uint8 (H, W, 3) (absent if `load_image=False`, which the
  depth tokenizer uses), `depth` float32 (H, W) metres, `_origin` the RGB path.
  """

  def __init__(self, root: str, split: str = "train",
               list_file: str | None = None, load_image: bool = True):
    if split not in ("train", "test"):
      raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    self.split = split
    self.data_root = (root if split == "train"
                      else os.path.join(root, "official_splits", "test"))
    self.list_file = list_file or os.path.join(root, f"{split}_list.txt")
    self.pairs = read_file_list(self.list_file)
    self.load_image = load_image

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, index: int) -> dict:
    rgb_rel, depth_rel = self.pairs[index]
    rgb_path = os.path.join(self.data_root, rgb_rel.lstrip("/"))
    depth_path = os.path.join(self.data_root, depth_rel.lstrip("/"))
    depth = image_io.read_depth_png(depth_path)
    record = {"depth": depth.astype(np.float32) / np.float32(1000.0),
              "_origin": rgb_path}
    if self.load_image:
      image = image_io.read_rgb(rgb_path)
      if image.shape[:2] != depth.shape:
        raise DataError(f"{depth_path}: depth is {depth.shape[0]}x"
                        f"{depth.shape[1]} but its image {rgb_path} is "
                        f"{image.shape[0]}x{image.shape[1]}")
      record["image"] = image
    return record

  def __repr__(self) -> str:
    return f"NyuDepthSource({self.list_file!r}, {len(self)} records)"
