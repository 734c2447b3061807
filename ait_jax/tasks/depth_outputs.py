"""Writing depth predictions to disk (`--mode predict`).

Per image three files: `{stem}_depth_mm.png`, a 16-bit single-channel PNG in whole
millimetres (the NYU/KITTI convention; 0 where the depth is not finite, values beyond
65.535 m saturate); `{stem}_depth_color.png`, an 8-bit RGB picture for people; and
`{stem}_depth.npy`, float32 metres as predicted.
"""

from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

# The viridis colour map sampled at 9 evenly spaced points (near = dark purple,
# far = yellow); perceptually uniform and readable in grey and by most colour-blind
# viewers. Colours between anchors are interpolated linearly in RGB.
_ANCHORS = np.array([
    [68, 1, 84], [71, 44, 122], [59, 82, 139], [44, 114, 142], [33, 145, 140],
    [40, 174, 128], [94, 201, 98], [173, 220, 48], [253, 231, 37]], np.float64)
_INVALID_RGB = (0, 0, 0)
_UINT16_MAX = np.iinfo(np.uint16).max


class DepthOutputPaths(NamedTuple):
  millimetres_png: Path
  color_png: Path
  metres_npy: Path


def to_millimetres(depth) -> np.ndarray:
  """Metres -> uint16 millimetres, rounded, clipped to [0, 65535]; non-finite -> 0."""
  depth = np.asarray(depth, np.float64)
  mm = np.where(np.isfinite(depth), np.rint(depth * 1000.0), 0.0)
  return np.clip(mm, 0, _UINT16_MAX).astype(np.uint16)


def colorize(depth, depth_range: tuple[float, float] | None = None) -> np.ndarray:
  """(H, W) metres -> (H, W, 3) uint8 RGB through the anchor colours.

  `depth_range` (near, far) fixes the scale, e.g. to compare images; by default it is
  the image's own finite minimum and maximum. Non-finite pixels are black.
  """
  depth = np.asarray(depth, np.float64)
  finite = np.isfinite(depth)
  if depth_range is None:
    values = depth[finite]
    depth_range = (values.min(), values.max()) if values.size else (0.0, 1.0)
  near, far = depth_range
  t = np.clip((np.where(finite, depth, near) - near) / max(far - near, 1e-12), 0, 1)
  pos = t * (len(_ANCHORS) - 1)
  lower = np.minimum(pos.astype(np.int64), len(_ANCHORS) - 2)
  frac = (pos - lower)[..., None]
  rgb = _ANCHORS[lower] * (1 - frac) + _ANCHORS[lower + 1] * frac
  rgb = np.where(finite[..., None], rgb, _INVALID_RGB)
  return np.rint(rgb).astype(np.uint8)


def write_depth_prediction(depth, out_dir, stem: str, *,
                           depth_range: tuple[float, float] | None = None
                           ) -> DepthOutputPaths:
  """Writes one (H, W) prediction in metres as the three files; returns their paths."""
  depth = np.asarray(depth, np.float32)
  if depth.ndim != 2:
    raise ValueError(f"a depth prediction is one (H, W) map, got shape {depth.shape}")
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = DepthOutputPaths(out_dir / f"{stem}_depth_mm.png",
                           out_dir / f"{stem}_depth_color.png",
                           out_dir / f"{stem}_depth.npy")
  Image.fromarray(to_millimetres(depth)).save(paths.millimetres_png)
  Image.fromarray(colorize(depth, depth_range)).save(paths.color_png)
  np.save(paths.metres_npy, depth)
  return paths
