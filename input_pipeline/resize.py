"""OpenCV-style resizing in numpy, computed only inside an output window.

The reference resizes with `cv2.resize` (through mmcv `imrescale`):
INTER_LINEAR for images and INTER_NEAREST for masks. PIL's resize antialiases
when it shrinks, so these kernels are written out instead:

* bilinear: half-pixel centres, edge clamping, no antialiasing, Q11 fixed-point
  weights and the rounding of OpenCV's vectorised 8-bit path. OpenCV itself was
  not available to compare against; expect at most 1 grey level of difference
  (its scalar tail rounds differently).
* halving both sides exactly: OpenCV switches INTER_LINEAR to its INTER_AREA
  fast path, the mean of each 2x2 block (uint8: `(sum + 2) >> 2`).
* float32 bilinear (`resize_bilinear_float`): the same taps in float arithmetic,
  as OpenCV's float path computes them.
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


def _taps(src: int, dst: int, start: int, stop: int, clamp_weight: bool):
  """Source taps (i0, i1) and float32 weight of i1 for output pixels [start, stop)."""
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
  # ... but only the rows of the vertical taps.
  return np.clip(i0, 0, src - 1), np.clip(i0 + 1, 0, src - 1), frac


def _linear_taps(src: int, dst: int, start: int, stop: int, clamp_weight: bool):
  """`_taps` with Q11 weights (w0, w1), as OpenCV's 8-bit path."""
  i0, i1, frac = _taps(src, dst, start, stop, clamp_weight)
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
  if _halves(h, w, out_h, out_w):
    total = _block_sums(image.astype(np.int32), (y0, y1, x0, x1))
    return ((total + 2) >> 2).astype(np.uint8)
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


def resize_bilinear_float(array: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """`cv2.resize(array, (out_w, out_h), INTER_LINEAR)` for float32 (H, W) or (H, W, C)."""
  array = np.asarray(array, np.float32)
  h, w = array.shape[:2]
  if (h, w) == (out_h, out_w):
    return array.copy()
  if _halves(h, w, out_h, out_w):
    return _block_sums(array, (0, out_h, 0, out_w)) * np.float32(0.25)
  extra = (1,) * (array.ndim - 2)
  r0, r1, fy = _taps(h, out_h, 0, out_h, clamp_weight=False)
  c0, c1, fx = _taps(w, out_w, 0, out_w, clamp_weight=True)
  fx = fx.reshape(-1, *extra)
  fy = fy.reshape(-1, 1, *extra)
  rows = (np.take(array, c0, axis=1) * (np.float32(1) - fx)
          + np.take(array, c1, axis=1) * fx)
  return (np.take(rows, r0, axis=0) * (np.float32(1) - fy)
          + np.take(rows, r1, axis=0) * fy)


def _halves(h: int, w: int, out_h: int, out_w: int) -> bool:
  """OpenCV's `is_area_fast` with scale 2 on both axes (`src / dst` exactly 2)."""
  return h / out_h == 2.0 and w / out_w == 2.0


def _block_sums(array: np.ndarray, window: Window) -> np.ndarray:
  """Sums of the 2x2 source blocks of output pixels [y0, y1) x [x0, x1)."""
  y0, y1, x0, x1 = window
  a = array[2 * y0:2 * y1, 2 * x0:2 * x1]
  return a[0::2, 0::2] + a[0::2, 1::2] + a[1::2, 0::2] + a[1::2, 1::2]


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
