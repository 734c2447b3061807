"""Instance masks in and out of their boxes (numpy, float32, host).

In: `crop_masks` is the reference's `crop_and_resize_gpu`, mmcv `roi_align` (aligned,
adaptive sampling, average) of each mask in its box, then `>= 0.5`. `roi_align`
follows mmcv's CPU kernel operation by operation in float32, so its values are the
kernel's bit for bit.

Out: `paste_probabilities` is mmdet's `_do_paste_mask`: every image pixel centre is
mapped into the box as a `grid_sample` coordinate (bilinear, zero padding,
`align_corners=False`, torch's vectorised CPU formulas). The reference pastes on CPU
in a window around each box (`window=True`: one pixel beyond it, the rest stays 0) and
on GPU over the whole image; the two agree except for degenerate boxes: a zero-width
or zero-height box samples the mask's centre line over the window only or over the
whole image, and where the window is empty or inverted (a box inverted by more than
about 2 px, or starting past the bottom/right edge) the reference's CPU branch raises,
while here nothing is pasted.
"""

import numpy as np

_F32 = np.float32


def _sample_points(start, size, grid: int, out_size: int) -> np.ndarray:
  """(grid, S) coordinates of the sub-samples of every output cell along one axis."""
  bin_size = size / _F32(out_size)
  cells = np.arange(out_size).astype(_F32)[None]
  index = (np.arange(grid).astype(_F32) + _F32(0.5))[:, None]
  return (start + cells * bin_size) + (index * bin_size) / _F32(grid)


def _bilinear_taps(coord: np.ndarray, size: int):
  """mmcv's bilinear taps along one axis: (inside, low, high, low weight, high weight).

  A sample more than one pixel outside the map contributes 0; otherwise coordinates
  below 0 are clamped to 0, and the last pixel is used for both taps at the far edge.
  """
  inside = (coord >= -1) & (coord <= size)
  coord = np.where(coord <= 0, _F32(0), coord)
  low = coord.astype(np.int64)
  at_edge = low >= size - 1
  low = np.where(at_edge, size - 1, low)
  high = np.where(at_edge, size - 1, low + 1)
  coord = np.where(at_edge, low.astype(_F32), coord)
  frac = coord - low.astype(_F32)
  return inside, low, high, _F32(1) - frac, frac


def roi_align(maps, boxes, out_size: int, indices=None) -> np.ndarray:
  """mmcv `roi_align(maps, rois, (S, S), 1.0, 0, 'avg', aligned=True)`.

  Crops `maps[indices[i]]` (default: `maps[i]`) in `boxes[i]`; maps (M, H, W), boxes
  (N, 4) pixels; returns (N, S, S) float32. Each output cell averages
  `ceil(box size / S)` samples per axis, summed one at a time in (y, x) order. A box
  of zero or negative size has no samples and gives 0 (mmcv's CUDA kernel; its CPU
  kernel rejects negative sizes).
  """
  maps = np.asarray(maps)
  boxes = np.asarray(boxes, _F32).reshape(-1, 4)
  indices = np.arange(len(boxes)) if indices is None else np.asarray(indices)
  if len(indices) != len(boxes) or (len(indices) and not (
      0 <= indices.min() and indices.max() < len(maps))):
    raise ValueError(f"roi_align: {len(boxes)} boxes for map indices {indices.tolist()} "
                     f"of {len(maps)} maps")
  _, height, width = maps.shape
  out = np.zeros((len(boxes), out_size, out_size), _F32)
  for i, (index, box) in enumerate(zip(indices, boxes)):
    x1, y1, x2, y2 = box - _F32(0.5)
    roi_w, roi_h = x2 - x1, y2 - y1
    grid_w, grid_h = (max(int(np.ceil(s / _F32(out_size))), 0) for s in (roi_w, roi_h))
    if grid_w == 0 or grid_h == 0:
      continue
    y_in, y_lo, y_hi, hy, ly = (a[:, :, None, None] for a in _bilinear_taps(
        _sample_points(y1, roi_h, grid_h, out_size), height))
    x_in, x_lo, x_hi, hx, lx = (a[None, None] for a in _bilinear_taps(
        _sample_points(x1, roi_w, grid_w, out_size), width))
    m = maps[index]
    rows_lo, rows_hi = m[y_lo[:, :, 0, 0]], m[y_hi[:, :, 0, 0]]  # (grid_h, S, W)

    def taps(rows, x):  # (grid_h, S, grid_w, S) float32 map values
      return rows[:, :, x[0, 0]].astype(_F32)

    # (grid_h, S, grid_w, S): sample (iy, ix) of output cell (ph, pw).
    value = ((((hy * hx) * taps(rows_lo, x_lo) + (hy * lx) * taps(rows_lo, x_hi))
              + (ly * hx) * taps(rows_hi, x_lo)) + (ly * lx) * taps(rows_hi, x_hi))
    value = np.where(y_in & x_in, value, _F32(0)).transpose(0, 2, 1, 3)
    total = np.cumsum(value.reshape(grid_h * grid_w, out_size, out_size), axis=0)[-1]
    out[i] = total / _F32(grid_h * grid_w)
  return out


def crop_masks(masks, boxes, out_size: int, indices=None) -> np.ndarray:
  """Binary (N, S, S) float32 crops of `masks[indices[i]]` (default `masks[i]`) in
  `boxes[i]` (see `roi_align`)."""
  return (roi_align(masks, boxes, out_size, indices) >= 0.5).astype(_F32)


def _grid_sample_axis(grid: np.ndarray, size: int):
  """torch grid_sample taps of normalised coordinates along one axis:
  (low index, high index, low weight, high weight, low inside, high inside)."""
  with np.errstate(invalid="ignore"):
    coord = (grid + _F32(1)) * _F32(size / 2) - _F32(0.5)
    low = np.floor(coord)
    frac = coord - low
    low_in = (low > -1) & (low < size)
    high_in = (low + 1 > -1) & (low + 1 < size)
  low_idx = np.where(low_in, low, 0).astype(np.int64)
  high_idx = np.where(high_in, low + 1, 0).astype(np.int64)
  return low_idx, high_idx, _F32(1) - frac, frac, low_in, high_in


def _paste_one(mask: np.ndarray, box: np.ndarray, rows: np.ndarray,
               cols: np.ndarray) -> np.ndarray:
  """grid_sample of `mask` (S, S) at the given image pixel rows and columns."""
  x1, y1, x2, y2 = box
  with np.errstate(divide="ignore", invalid="ignore"):
    gx = (cols.astype(_F32) + _F32(0.5) - x1) / (x2 - x1) * _F32(2) - _F32(1)
    gy = (rows.astype(_F32) + _F32(0.5) - y1) / (y2 - y1) * _F32(2) - _F32(1)
  gx = np.where(np.isinf(gx), _F32(0), gx)  # zero-size boxes: +-inf becomes 0
  gy = np.where(np.isinf(gy), _F32(0), gy)
  s_h, s_w = mask.shape
  x_lo, x_hi, e, w, x_lo_in, x_hi_in = _grid_sample_axis(gx, s_w)
  y_lo, y_hi, s, n, y_lo_in, y_hi_in = _grid_sample_axis(gy, s_h)
  s, n = s[:, None], n[:, None]

  def tap(y, x, y_in, x_in):
    return np.where(y_in[:, None] & x_in[None, :], mask[y][:, x], _F32(0))

  return (((tap(y_lo, x_lo, y_lo_in, x_lo_in) * (s * e)
            + tap(y_lo, x_hi, y_lo_in, x_hi_in) * (s * w))
           + tap(y_hi, x_lo, y_hi_in, x_lo_in) * (n * e))
          + tap(y_hi, x_hi, y_hi_in, x_hi_in) * (n * w))


def paste_probabilities(masks, boxes, height: int, width: int, *,
                        window: bool = True) -> np.ndarray:
  """Masks (N, S, S) resampled into their boxes (N, 4) on an image: (N, H, W) float32.

  With `window` only the pixels `[floor(x1) - 1, ceil(x2) + 1)` (clipped to the image,
  likewise for rows) of each box are sampled and the rest is 0; see the module
  docstring.
  """
  masks = np.asarray(masks, _F32)
  boxes = np.asarray(boxes, _F32).reshape(-1, 4)
  out = np.zeros((len(masks), height, width), _F32)
  for i, (mask, box) in enumerate(zip(masks, boxes)):
    if window:
      x0 = max(int(np.floor(box[0])) - 1, 0)
      y0 = max(int(np.floor(box[1])) - 1, 0)
      x1 = min(int(np.ceil(box[2])) + 1, width)
      y1 = min(int(np.ceil(box[3])) + 1, height)
    else:
      x0, y0, x1, y1 = 0, 0, width, height
    if x1 > x0 and y1 > y0:
      out[i, y0:y1, x0:x1] = _paste_one(mask, box, np.arange(y0, y1), np.arange(x0, x1))
  return out


def paste_masks(masks, boxes, height: int, width: int, *, window: bool = True,
                threshold: float = 0.5) -> np.ndarray:
  """Binary (N, H, W) image masks: `paste_probabilities >= threshold`."""
  return paste_probabilities(masks, boxes, height, width, window=window) >= threshold
