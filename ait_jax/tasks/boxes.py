"""Boxes as tokens, and the Pix2Seq noise boxes of sequence augmentation (numpy, host).

Boxes are `x1, y1, x2, y2` in pixels of the resized image. Everything is float32 in
the reference's order of operations, so that box tokens equal the reference's
exactly: a coordinate becomes `clip(rint(float32(x / norm_val) * num_bins), 0,
num_bins)`, where `rint` rounds half to even like `torch.round`. The boxes are always
normalised by the fixed `norm_val` (the reference's `coord_norm='abs'`), never by the
image size.
"""

from typing import NamedTuple

import numpy as np

_F32 = np.float32


def to_bins(boxes, norm_val: float, num_bins: int) -> np.ndarray:
  """float32 bin coordinates before rounding: the division first, then the product."""
  return (np.asarray(boxes, _F32) / _F32(norm_val)) * _F32(num_bins)


def quantize(boxes, norm_val: float, num_bins: int) -> np.ndarray:
  """int32 box tokens in [0, num_bins] (rounding half to even)."""
  return np.clip(np.rint(to_bins(boxes, norm_val, num_bins)), 0, num_bins).astype(np.int32)


def dequantize(tokens, norm_val: float, num_bins: int) -> np.ndarray:
  """float32 pixel coordinates `token * norm_val / num_bins` of box tokens.

  As in the reference, an integer `norm_val` multiplies in integers and the product
  is divided in float32.
  """
  tokens = np.asarray(tokens, np.int64)
  if float(norm_val).is_integer():
    product = (tokens * int(norm_val)).astype(_F32)
  else:
    product = tokens.astype(_F32) * _F32(norm_val)
  return product / _F32(num_bins)


def image_scale(img_hw) -> np.ndarray:
  """float32 `(w, h, w, h)` of an image of size `(h, w)`."""
  h, w = int(img_hw[0]), int(img_hw[1])
  return np.array([w, h, w, h], _F32)


def clip_to_image(boxes, img_hw) -> np.ndarray:
  """Boxes clamped to `[0, w] x [0, h]`."""
  return np.minimum(np.maximum(np.asarray(boxes, _F32), _F32(0)), image_scale(img_hw))


def truncated_normal(rng: np.random.Generator, shape) -> np.ndarray:
  """float32 standard normal samples cut at +-2 (timm's `trunc_normal_` defaults)."""
  out = rng.standard_normal(shape)
  bad = np.abs(out) > 2
  while bad.any():
    out[bad] = rng.standard_normal(int(bad.sum()))
    bad = np.abs(out) > 2
  return out.astype(_F32)


class NoiseBoxes(NamedTuple):
  """Pix2Seq noise objects of one image, in sequence order."""
  boxes: np.ndarray   # (m, 4) float32, clipped to the image
  is_bad: np.ndarray  # (m,) bool: a random or shifted box, not a jittered duplicate
  source: np.ndarray  # (m,) int32: the real object a duplicate jitters; -1 for bad


def noise_boxes(rng: np.random.Generator, boxes, img_hw, num_noise: int) -> NoiseBoxes:
  """`num_noise` noise boxes for the real `boxes` (n, 4) of an image of size `img_hw`.

  The reference's recipe: a uniform number of them (none without real objects) are
  duplicates of real boxes, tiled as needed, jittered by up to 10% of their size
  (truncated normal / 20) and clipped. The others are "bad": picked at random among
  as many random boxes (uniform centre, truncated-normal half size of up to half the
  image) and as many real boxes moved to a uniform centre. They are shuffled
  together and clipped to the image.
  """
  boxes = np.asarray(boxes, _F32).reshape(-1, 4)
  n = len(boxes)
  num_noise = max(int(num_noise), 0)
  scale = image_scale(img_hw)
  num_dup = int(rng.integers(0, num_noise + 1)) if n else 0
  num_bad = num_noise - num_dup
  tiled = np.tile(np.arange(n), num_noise // n + 1 if n else 1)

  centre = rng.random((num_bad, 2), dtype=_F32)
  half = np.abs(truncated_normal(rng, (num_bad, 2))) / _F32(4)
  random_boxes = np.concatenate([centre - half, centre + half], axis=1) * scale
  moved = boxes[tiled[rng.permutation(len(tiled))[:num_bad]]]
  centre = rng.random((len(moved), 2), dtype=_F32) * scale[:2]
  half = (moved[:, 2:] - moved[:, :2]) / _F32(2)
  shifted = np.concatenate([centre - half, centre + half], axis=1)
  candidates = np.concatenate([random_boxes, shifted])
  bad = candidates[rng.permutation(len(candidates))[:num_bad]]

  dup_source = tiled[rng.permutation(len(tiled))[:num_dup]]
  dup = boxes[dup_source]
  size = np.stack([dup[:, 2] - dup[:, 0], dup[:, 3] - dup[:, 1]] * 2, axis=1)
  dup = clip_to_image(
      dup + size * (truncated_normal(rng, (num_dup, 4)) / _F32(2) * _F32(0.1)), img_hw)

  order = rng.permutation(num_noise)
  return NoiseBoxes(
      boxes=clip_to_image(np.concatenate([bad, dup]).reshape(-1, 4)[order], img_hw),
      is_bad=np.concatenate([np.ones(num_bad, bool), np.zeros(num_dup, bool)])[order],
      source=np.concatenate([np.full(num_bad, -1), dup_source]).astype(np.int32)[order])
