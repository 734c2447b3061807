"""Reading images and 16-bit depth PNGs with PIL, with errors that name the file.

The reference reads with OpenCV (`cv2.imread`, then BGR->RGB;
`cv2.IMREAD_UNCHANGED` for depth). PIL and OpenCV both decode JPEG with
libjpeg(-turbo) defaults, so decoded pixels agree up to the library builds.
"""

import os

import numpy as np
from PIL import Image

from input_pipeline.errors import DataError


def _open(path: str) -> Image.Image:
  if not os.path.exists(path):
    raise DataError(f"{path}: file not found")
  try:
    image = Image.open(path)
    image.load()
  except (OSError, SyntaxError, ValueError) as e:
    raise DataError(f"{path}: cannot decode image ({e})") from e
  return image


def read_rgb(path: str) -> np.ndarray:
  """RGB image as uint8 (H, W, 3); greyscale and palette images are expanded."""
  with _open(path) as image:
    return np.asarray(image.convert("RGB"))


def read_depth_png(path: str) -> np.ndarray:
  """Single-channel 16-bit PNG as uint16 (H, W) (NYU/BTS depth in millimetres)."""
  with _open(path) as image:
    if image.mode not in ("I;16", "I;16B", "I;16L", "I"):
      raise DataError(
          f"{path}: expected a single-channel 16-bit depth PNG, got mode "
          f"{image.mode!r}")
    depth = np.asarray(image)
  if depth.ndim != 2 or depth.min(initial=0) < 0 or depth.max(initial=0) > 65535:
    raise DataError(f"{path}: depth values outside uint16")
  return depth.astype(np.uint16)
