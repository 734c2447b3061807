"""Depth transforms (grain), after the reference's NYUv2 datasets.

AiT training (`BaseDataset.augment_training_data`, code/model/depth/depth.py):
every fourth sample gets a depth stripe pasted into the image, then
albumentations `Compose([HorizontalFlip(), RandomCrop(480, 480),
RandomBrightnessContrast(), RandomGamma(), HueSaturationValue()])` with their
default probabilities (0.5 each; the crop always), then `ToTensor` (image / 255,
depth as is) and depth / 1000. Test time is `ToTensor` only.

VQ-VAE training (vae/dataset/nyudepthv2.py): depth only, `Crop(41, 0, 601,
480)`, `HorizontalFlip()`, `RandomCrop(480, 480)`, depth / 1000, then
`MaskGenerator` (mask ratio 0.5, 16-pixel patches): the input is masked, the
target whole.

Sources already give depth in metres; geometric ops move `image`, `depth` and
`masked_depth` together (whichever are present).
"""

import math
from typing import Sequence

import grain
import numpy as np

from input_pipeline import color
from input_pipeline import resize
from input_pipeline.transforms_common import Record

_SPATIAL_KEYS = ("image", "depth", "masked_depth")


def _spatial(record: Record, keys: Sequence[str]) -> list[str]:
  return [k for k in keys if k in record]


class DepthStripe(grain.transforms.RandomMap):
  """Pastes the depth map into a vertical stripe of every `every`-th image.

  Reference: `augment_training_data` with `self.count % 4 == 0`: `l =
  int(alpha * W)`, `w = int(max((W - alpha * W) * beta * 0.75, 1))` with alpha,
  beta uniform in [0, 1), and all three channels of `image[:, l:l+w]` set to
  the depth in millimetres. The image is uint8, so numpy wraps the millimetres
  modulo 256; this op writes that wrapped value explicitly. The reference counts
  samples per dataset copy (per loader worker); here the record's position in
  this process's stream decides, which keeps it independent of worker count.
  """

  def __init__(self, every: int = 4, width_factor: float = 0.75):
    self.every = every
    self.width_factor = width_factor

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    if "_position" not in record:
      raise KeyError("DepthStripe needs the record's '_position' (set by the "
                     "loader)")
    if record["_position"] % self.every:
      return record
    alpha, beta = rng.random(), rng.random()
    image = record["image"].copy()
    width = image.shape[1]
    left = int(alpha * width)
    span = int(max((width - alpha * width) * beta * self.width_factor, 1))
    millimetres = np.rint(record["depth"][:, left:left + span] * 1000)
    image[:, left:left + span, :] = (
        millimetres.astype(np.int64) % 256).astype(np.uint8)[..., None]
    return {**record, "image": image}


class HorizontalFlip(grain.transforms.RandomMap):
  """albumentations `HorizontalFlip(p=0.5)` of image and dense targets."""

  def __init__(self, p: float = 0.5, keys: Sequence[str] = _SPATIAL_KEYS):
    self.p = p
    self.keys = tuple(keys)

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    if rng.random() >= self.p:
      return record
    return {**record, **{k: np.ascontiguousarray(record[k][:, ::-1])
                         for k in _spatial(record, self.keys)}}


class Crop(grain.transforms.Map):
  """albumentations `Crop(x_min, y_min, x_max, y_max)` (fixed box)."""

  def __init__(self, x_min: int, y_min: int, x_max: int, y_max: int,
               keys: Sequence[str] = _SPATIAL_KEYS):
    self.box = (x_min, y_min, x_max, y_max)
    self.keys = tuple(keys)

  def map(self, record: Record) -> Record:
    x0, y0, x1, y1 = self.box
    keys = _spatial(record, self.keys)
    h, w = record[keys[0]].shape[:2]
    if x1 > w or y1 > h:
      raise ValueError(f"Crop box {self.box} exceeds the {h}x{w} input")
    return {**record, **{k: record[k][y0:y1, x0:x1] for k in keys}}


class RandomCrop(grain.transforms.RandomMap):
  """albumentations `RandomCrop(height, width)`: offset `int((H - h) * u)`."""

  def __init__(self, height: int, width: int,
               keys: Sequence[str] = _SPATIAL_KEYS):
    self.size = (height, width)
    self.keys = tuple(keys)

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    keys = _spatial(record, self.keys)
    h, w = record[keys[0]].shape[:2]
    ch, cw = self.size
    if ch > h or cw > w:
      raise ValueError(f"RandomCrop {ch}x{cw} is larger than the {h}x{w} input")
    y0 = int((h - ch) * rng.random())
    x0 = int((w - cw) * rng.random())
    return {**record, **{k: record[k][y0:y0 + ch, x0:x0 + cw] for k in keys}}


class RandomBrightnessContrast(grain.transforms.RandomMap):
  """albumentations `RandomBrightnessContrast()`: p 0.5, limits 0.2 each.

  alpha = 1 + U(-c, c), beta = U(-b, b); value * alpha + beta * 255.
  """

  def __init__(self, brightness_limit: float = 0.2,
               contrast_limit: float = 0.2, p: float = 0.5):
    self.brightness_limit = brightness_limit
    self.contrast_limit = contrast_limit
    self.p = p

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    if rng.random() >= self.p:
      return record
    alpha = 1.0 + rng.uniform(-self.contrast_limit, self.contrast_limit)
    beta = rng.uniform(-self.brightness_limit, self.brightness_limit)
    return {**record,
            "image": color.brightness_contrast(record["image"], alpha, beta)}


class RandomGamma(grain.transforms.RandomMap):
  """albumentations `RandomGamma()`: p 0.5, gamma U(80, 120) / 100."""

  def __init__(self, gamma_limit: tuple[float, float] = (80, 120),
               p: float = 0.5):
    self.gamma_limit = gamma_limit
    self.p = p

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    if rng.random() >= self.p:
      return record
    value = rng.uniform(*self.gamma_limit) / 100.0
    return {**record, "image": color.gamma(record["image"], value)}


class HueSaturationValue(grain.transforms.RandomMap):
  """albumentations `HueSaturationValue()`: p 0.5, shifts U(+-20, +-30, +-20)."""

  def __init__(self, hue_shift_limit: float = 20, sat_shift_limit: float = 30,
               val_shift_limit: float = 20, p: float = 0.5):
    self.limits = (hue_shift_limit, sat_shift_limit, val_shift_limit)
    self.p = p

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    if rng.random() >= self.p:
      return record
    shifts = [rng.uniform(-limit, limit) for limit in self.limits]
    return {**record, "image": color.shift_hsv(record["image"], *shifts)}


class Resize(grain.transforms.Map):
  """Resizes the image bilinearly and depth by nearest neighbour.

  Not part of the reference configs (its `scale_size` option assigns the
  resized image to the depth, a bug its configs never reach); this is for small
  demo resolutions. Nearest keeps every depth value a real measurement.
  """

  def __init__(self, height: int, width: int):
    self.size = (height, width)

  def map(self, record: Record) -> Record:
    h, w = self.size
    out = dict(record)
    if "image" in record:
      out["image"] = resize.resize_bilinear(record["image"], h, w)
    for key in ("depth", "masked_depth"):
      if key in record:
        out[key] = resize.resize_nearest(record[key], h, w)
    return out


class MaskPatches(grain.transforms.RandomMap):
  """The VQ-VAE's mask augmentation (`MaskGenerator`, vae/dataset/nyudepthv2.py).

  `ceil(n_patches * mask_ratio)` of the `patch` x `patch` cells are zeroed in
  `masked_depth` (the VQ-VAE input); `depth` (the target) stays whole.
  """

  def __init__(self, mask_ratio: float = 0.5, patch: int = 16):
    if not 0 < mask_ratio <= 1:
      raise ValueError(f"mask_ratio must be in (0, 1], got {mask_ratio}")
    self.mask_ratio = mask_ratio
    self.patch = patch

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    depth = record["depth"]
    h, w = depth.shape[:2]
    if h % self.patch or w % self.patch:
      raise ValueError(f"depth {h}x{w} is not a multiple of the mask patch "
                       f"{self.patch}")
    rows, cols = h // self.patch, w // self.patch
    count = int(math.ceil(rows * cols * self.mask_ratio))
    keep = np.ones(rows * cols, depth.dtype)
    keep[rng.permutation(rows * cols)[:count]] = 0
    keep = np.repeat(np.repeat(keep.reshape(rows, cols), self.patch, axis=0),
                     self.patch, axis=1)
    return {**record, "masked_depth": depth * keep.reshape(depth.shape)}


class ToFloat(grain.transforms.Map):
  """`ToTensor`, NHWC: image uint8 -> float32 / 255, depth maps -> (H, W, 1)."""

  def map(self, record: Record) -> Record:
    out = dict(record)
    if "image" in record:
      out["image"] = record["image"].astype(np.float32) / np.float32(255)
    for key in ("depth", "masked_depth"):
      if key in record:
        out[key] = np.asarray(record[key], np.float32)[..., None]
    return out


def depth_train_ops(crop_size: tuple[int, int] = (480, 480),
                    boundary_crop: tuple[int, int, int, int] | None = None
                   ) -> list[grain.transforms.Map | grain.transforms.RandomMap]:
  """AiT depth training augmentation; `boundary_crop` is `crop_boundary=True`."""
  ops = [DepthStripe()]
  if boundary_crop is not None:
    ops.append(Crop(*boundary_crop))
  ops += [HorizontalFlip(), RandomCrop(*crop_size), RandomBrightnessContrast(),
          RandomGamma(), HueSaturationValue(), ToFloat()]
  return ops


def depth_tokenizer_train_ops(
    crop_size: tuple[int, int] = (480, 480),
    boundary_crop: tuple[int, int, int, int] | None = (41, 0, 601, 480),
    mask_ratio: float | None = 0.5,
    mask_patch: int = 16,
) -> list[grain.transforms.Map | grain.transforms.RandomMap]:
  """VQ-VAE depth training: crop, flip, random crop, then mask patches."""
  ops = [] if boundary_crop is None else [Crop(*boundary_crop)]
  ops += [HorizontalFlip(), RandomCrop(*crop_size)]
  if mask_ratio is not None:
    ops.append(MaskPatches(mask_ratio, mask_patch))
  return ops + [ToFloat()]
