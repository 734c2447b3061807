"""Constant tables and window reshapes of the SwinV2 backbone.

The reference registers two of these tables as buffers in every attention block
(`relative_coords_table`, `relative_position_index`); the checkpoint mapping recomputes
them with these functions to check and export them.
"""

import numpy as np


def relative_coords_table(window: int, pretrain_window: int) -> np.ndarray:
  """(1, 2w-1, 2w-1, 2) float32 `(dh, dw)` offsets, scaled as `norm8_log_bylayer`.

  Offsets are divided by `pretrain_window - 1` (not `window - 1`), stretched to
  [-8, 8] and mapped to `sign(t) * log2(1 + |t|) / 3`.
  """
  if pretrain_window == 1:
    raise ValueError("pretrain window size 1 divides the offsets by zero")
  # float32 step by step, as the reference computes it (bit-identical to its buffer).
  f32 = np.float32
  offsets = np.arange(-(window - 1), window, dtype=f32)
  table = np.stack(np.meshgrid(offsets, offsets, indexing="ij"), axis=-1)
  table = table / f32(pretrain_window - 1) * f32(8)
  table = np.sign(table) * np.log2(np.abs(table) + f32(1)) / f32(3)
  return table[None]


def relative_position_index(window: int, xp=np):
  """(N, N) index into the flattened coords table, N = window**2 (row-major).

  Entry (i, j) is `(dh + w-1) * (2w-1) + (dw + w-1)` with `dh = h_i - h_j`. `xp` is
  numpy (int64, as the reference buffer) or jax.numpy (int32, traced, no constant).
  """
  pos = xp.arange(window * window)
  rows, cols = pos // window, pos % window
  dh = rows[:, None] - rows[None, :]
  dw = cols[:, None] - cols[None, :]
  index = (dh + window - 1) * (2 * window - 1) + (dw + window - 1)
  return index.astype(np.int64) if xp is np else index


def shift_region_ids(padded_hw: tuple[int, int], window: int, shift: int) -> np.ndarray:
  """(num_windows, window**2) region ids of the rolled, padded map.

  Per axis the regions are `[0, P-window)`, `[P-window, P-shift)`, `[P-shift, P)` of
  the padded extent P; tokens of different regions may not attend to each other.
  """
  def axis_ids(extent):
    pos = np.arange(extent)
    return (pos >= extent - window).astype(np.int32) + (pos >= extent - shift)

  hp, wp = padded_hw
  ids = axis_ids(hp)[:, None] * 3 + axis_ids(wp)[None, :]
  return window_partition(ids[None, :, :, None], window)[0, :, :, 0]


def window_partition(x, window: int):
  """(B, H, W, C) -> (B, num_windows, window**2, C), windows in row-major order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // window) * (w // window), window * window, c)


def window_merge(windows, window: int, hw: tuple[int, int]):
  """Inverse of `window_partition` for a map of size `hw`."""
  b, _, _, c = windows.shape
  h, w = hw
  x = windows.reshape(b, h // window, w // window, window, window, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)
