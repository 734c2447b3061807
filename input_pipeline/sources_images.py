"""Image files without annotations: the input of `--mode predict --input PATH`.

`PATH` is one image file or a folder; a folder's `.jpg`/`.jpeg`/`.png` files (any
letter case) are taken in sorted order, not recursively. Images are decoded only when
read, so a corrupt file raises `DataError` naming it when its turn comes.
"""

import os

from input_pipeline.errors import DataError
from input_pipeline.image_io import read_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def list_images(path: str) -> list[str]:
  """The image files that `path` names (a file, or a folder's images, sorted)."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise DataError(f"{path}: no such image file or folder")
  files = sorted(os.path.join(path, name) for name in os.listdir(path)
                 if name.lower().endswith(IMAGE_EXTENSIONS)
                 and os.path.isfile(os.path.join(path, name)))
  if not files:
    raise DataError(f"{path}: the folder holds no {'/'.join(IMAGE_EXTENSIONS)} image")
  return files


class ImageFileSource:
  """Random access to image files: `source[i]` -> {image (H, W, 3) uint8, path, stem}."""

  def __init__(self, path: str):
    self.paths = list_images(path)
    stems = [os.path.splitext(os.path.basename(p))[0] for p in self.paths]
    if len(set(stems)) != len(stems):
      repeated = sorted({s for s in stems if stems.count(s) > 1})
      raise DataError(f"{path}: several images share the stem(s) {repeated}, so their "
                      "outputs would overwrite each other")
    self.stems = stems

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict:
    return {"image": read_rgb(self.paths[index]), "path": self.paths[index],
            "stem": self.stems[index]}

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def __repr__(self) -> str:
    return f"ImageFileSource({len(self)} images)"

