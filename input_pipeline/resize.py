"""OpenCV-style resizing in numpy, computed only inside an output window.

The reference resizes with `cv2.resize` (through mmcv `imrescale`):
INTER_LINEAR for images and INTER_NEAREST for masks. PIL's resize antialiases
when it shrinks, so these kernels are written out instead:

* bilinear: half-pixel centres, edge clamping, no antialiasing, Q11 fixed-point
  weights and the rounding of OpenCV's vectorised 8-bit path. OpenCV itself was
  not available to compare against; expect at most 1 grey level of difference
  (its scalar tail rounds differently).
* nearest: OpenCV's INTER_NEAREST, `src = floor(dst * src_size / dst_size)`
  (not half-pixel centred).

A window `(y0, y1, x0, x1)` of the resized image can be computed without the
rest, which makes "resize by up to 3x, then crop 640x640" cost a 640x640 resize.
"""

from typing import Sequence

import numpy as np

_COEF_BITS = 11
_COEF_SCALE = 1 << _COEF_BITS

Window = tuple[int, int, int, int]


def rescale_size(height: int, width: int,
                 scale: Sequence[int]) -> tuple[int, int]:
  """Output (h, w) of mmcv `imrescale`: fit the long and short edges of `scale`."""
  long_edge, short_edge = max(scale), min(scale)
  factor = min(long_edge / max(height, width), short_edge / min(height, width))
  return int(height * factor + 0.5), int(width * factor + 0.5)


def _linear_taps(src: int, dst: int, start: int, stop: int, clamp_weight: bool):
  """Source taps (i0, i1) and Q11 weights (w0, w1) for output pixels [start, stop)."""
  scale = 1.0 / (dst / src)
  coord = ((np.arange(start, stop, dtype=np.float64) + 0.5) * scale
           - 0.5).astype(np.float32)
  i0 = np.floor(coord).astype(np.int64)
  frac = coord - i0.astype(np.float32)
  if clamp_weight:  # OpenCV clamps the horizontal taps and their weights ...
    frac[i0 < 0] = 0
    i0[i0 < 0] = 0
    frac[i0 >= src - 1] = 0
    i0[i0 >= src - 1] = src - 1
  i1 = np.clip(i0 + 1, 0, src - 1)  # ... but only the rows of the vertical taps.
  i0 = np.clip(i0, 0, src - 1)
  w0 = np.rint((np.float32(1) - frac) * np.float32(_COEF_SCALE)).astype(np.int32)
  w1 = np.rint(frac * np.float32(_COEF_SCALE)).astype(np.int32)
  return i0, i1, w0, w1


def resize_bilinear(image: np.ndarray, out_h: int, out_w: int,
                    window: Window | None = None) -> np.ndarray:
  """`cv2.resize(image, (out_w, out_h), INTER_LINEAR)[y0:y1, x0:x1]` for uint8."""
  if image.dtype != np.uint8:
    raise TypeError(f"resize_bilinear expects uint8, got {image.dtype}")
  h, w = image.shape[:2]
  y0, y1, x0, x1 = window or (0, out_h, 0, out_w)
  if (h, w) == (out_h, out_w):
    return image[y0:y1, x0:x1].copy()
  r0, r1, b0, b1 = _linear_taps(h, out_h, y0, y1, clamp_weight=False)
  c0, c1, a0, a1 = _linear_taps(w, out_w, x0, x1, clamp_weight=True)
  rows = np.unique(np.concatenate([r0, r1]))
  lookup = np.zeros(h, np.int64)
  lookup[rows] = np.arange(rows.size)
  src = image[rows].astype(np.int32)
  extra = (1,) * (image.ndim - 2)
  # Horizontal pass in Q11 (exact in int32), then the vectorised vertical
  # pass: ((S0 >> 4) * b0 >> 16) + ((S1 >> 4) * b1 >> 16), rounded by >> 2.
  horiz = np.take(src, c0, axis=1)
  horiz *= a0.reshape(-1, *extra)
  right = np.take(src, c1, axis=1)
  right *= a1.reshape(-1, *extra)
  horiz += right
  horiz >>= 4
  shape = (-1, 1) + extra
  out = np.take(horiz, lookup[r0], axis=0)
  out *= b0.reshape(shape)
  out >>= 16
  bottom = np.take(horiz, lookup[r1], axis=0)
  bottom *= b1.reshape(shape)
  bottom >>= 16
  out += bottom
  out += 2
  out >>= 2
  return out.astype(np.uint8)  # in [0, 255]: b0 + b1 = 2048


def nearest_indices(src: int, dst: int, start: int, stop: int) -> np.ndarray:
  """Source indices of cv2 INTER_NEAREST for output pixels [start, stop)."""
  inv = 1.0 / (dst / src)
  idx = np.floor(np.arange(start, stop, dtype=np.float64) * inv).astype(np.int64)
  return np.minimum(idx, src - 1)


def resize_nearest(arrays: np.ndarray, out_h: int, out_w: int,
                   window: Window | None = None) -> np.ndarray:
  """cv2 INTER_NEAREST resize of the last two axes of `arrays`, then window."""
  h, w = arrays.shape[-2:]
  y0, y1, x0, x1 = window or (0, out_h, 0, out_w)
  rows = nearest_indices(h, out_h, y0, y1)
  cols = nearest_indices(w, out_w, x0, x1)
  return arrays[..., rows[:, None], cols[None, :]]
