"""Photometric ops on uint8 RGB images, written after albumentations + OpenCV.

Each op is the lookup-table form albumentations uses for uint8 images:
`RandomBrightnessContrast`, `RandomGamma` and `HueSaturationValue`. The HSV
conversions follow OpenCV's 8-bit `COLOR_RGB2HSV` (fixed-point tables,
hue in [0, 180)) and `COLOR_HSV2RGB` (float sector formula).
"""

import numpy as np

_HSV_SHIFT = 12


def brightness_contrast(image: np.ndarray, alpha: float,
                        beta: float) -> np.ndarray:
  """`value * alpha + beta * 255`, clipped and truncated (brightness_by_max)."""
  lut = np.arange(256, dtype=np.float32)
  if alpha != 1:
    lut *= alpha
  if beta != 0:
    lut += beta * 255
  return np.clip(lut, 0, 255).astype(np.uint8)[image]


def gamma(image: np.ndarray, gamma_value: float) -> np.ndarray:
  """`(value / 255) ** gamma * 255`, truncated."""
  table = (np.arange(0, 256.0 / 255, 1.0 / 255) ** gamma_value) * 255
  return table.astype(np.uint8)[image]


def _tables() -> tuple[np.ndarray, np.ndarray]:
  i = np.arange(1, 256, dtype=np.float64)
  sdiv = np.zeros(256, np.int32)
  hdiv = np.zeros(256, np.int32)
  sdiv[1:] = np.rint((255 << _HSV_SHIFT) / i)
  hdiv[1:] = np.rint((180 << _HSV_SHIFT) / (6 * i))
  return sdiv, hdiv


_SDIV, _HDIV = _tables()


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
  """OpenCV 8-bit RGB->HSV: uint8 (..., 3) with H in [0, 180)."""
  r, g, b = (image[..., k].astype(np.int32) for k in range(3))
  v = np.maximum(np.maximum(r, g), b)
  diff = v - np.minimum(np.minimum(r, g), b)
  half = 1 << (_HSV_SHIFT - 1)
  s = (diff * _SDIV[v] + half) >> _HSV_SHIFT
  h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff,
                                       r - g + 4 * diff))
  h = (h * _HDIV[diff] + half) >> _HSV_SHIFT
  h += 180 * (h < 0)
  return np.stack([h, s, v], axis=-1).astype(np.uint8)


def _hsv_factors() -> np.ndarray:
  """(256, 256, 3) float32: RGB = V * factor[H, S] in OpenCV's sector formula.

  OpenCV computes p = v(1 - s), q = v(1 - s f), t = v(1 - s(1 - f)) from
  h * 6/180 (sector and fraction f); each channel is v times a factor of (h, s)
  alone, so the factors are tabulated once (float32, same operations).
  """
  h = np.arange(256, dtype=np.float32)[:, None] * np.float32(6.0 / 180.0)
  s = np.arange(256, dtype=np.float32)[None, :] * np.float32(1.0 / 255.0)
  h = np.where(h >= 6, h - 6, h)
  sector = np.broadcast_to(np.floor(h).astype(np.int32), (256, 256))
  frac = h - np.floor(h)
  one = np.float32(1)
  v, p, q, t = (np.broadcast_to(x, (256, 256)).astype(np.float32)
                for x in (one, one - s, one - s * frac, one - s * (one - frac)))
  return np.stack([np.choose(sector, [v, q, p, p, t, v]),
                   np.choose(sector, [t, v, v, q, p, p]),
                   np.choose(sector, [p, p, t, v, v, q])], axis=-1)


_HSV_FACTORS = _hsv_factors()


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
  """OpenCV 8-bit HSV->RGB (H in [0, 180)): the float sector formula."""
  v = hsv[..., 2].astype(np.float32) * np.float32(1.0 / 255.0)
  rgb = v[..., None] * _HSV_FACTORS[hsv[..., 0], hsv[..., 1]]
  return np.clip(np.rint(rgb * np.float32(255)), 0, 255).astype(np.uint8)


def shift_hsv(image: np.ndarray, hue_shift: float, sat_shift: float,
              val_shift: float) -> np.ndarray:
  """albumentations `_shift_hsv_uint8`: shift H (mod 180), S and V (clipped)."""
  hsv = rgb_to_hsv(image)
  base = np.arange(256, dtype=np.int16)
  luts = [np.mod(base + hue_shift, 180).astype(np.uint8),
          np.clip(base + sat_shift, 0, 255).astype(np.uint8),
          np.clip(base + val_shift, 0, 255).astype(np.uint8)]
  shifts = (hue_shift, sat_shift, val_shift)
  channels = [lut[hsv[..., k]] if shift != 0 else hsv[..., k]
              for k, (lut, shift) in enumerate(zip(luts, shifts))]
  return hsv_to_rgb(np.stack(channels, axis=-1))
