"""Synthetic data in the real on-disk formats, from ray-cast indoor scenes.

Each scene is a room (floor with a checker texture, walls, ceiling) with a few
balls, cubes and pillars standing on the floor, seen by a pinhole camera with
NYUv2-like intrinsics and lit by a point light. Every pixel is ray-cast, so the
depth (camera z, metres) and the instance masks are exact, and the image
carries the geometry through perspective, texture and shading: a model can
learn depth and instances from it.

Written layouts (what the sources read):

  OUT/nyu_depth_v2/train_list.txt, test_list.txt      BTS file lists
  OUT/nyu_depth_v2/scene_XXX/rgb_XXXXX.jpg             + sync_depth_XXXXX.png
  OUT/nyu_depth_v2/official_splits/test/scene_XXX/...  (16-bit mm PNG depth)
  OUT/coco/annotations/instances_{train,val}2017.json
  OUT/coco/{train,val}2017/XXXXXXXXXXXX.jpg

COCO masks are polygons where a pixel-corner polygon reproduces the mask
exactly through pycocotools, RLE otherwise (holes); some images carry a crowd
annotation (a cluster of small balls, uncompressed RLE, `iscrowd=1`).

The COCO layout may hold flat shapes instead of rooms (`render_shapes`, scenes
'shapes', 1-3 per image, or 'one_shape'): the same three categories, easier to find
for a small model trained briefly.

  python -m input_pipeline.synthetic --out DIR [--num-train N --num-test N
      --height H --width W --seed S --coco-scenes rooms|shapes|one_shape]
"""

import argparse
import dataclasses
import functools
import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

CATEGORIES = ({"id": 1, "name": "ball", "supercategory": "shape"},
              {"id": 2, "name": "cube", "supercategory": "shape"},
              {"id": 4, "name": "pillar", "supercategory": "shape"})
_NYU_FOCAL = 518.8579  # NYUv2 fx at 640 px wide.
_MAX_DEPTH = 9.9


@dataclasses.dataclass
class Scene:
  image: np.ndarray  # uint8 (H, W, 3)
  depth: np.ndarray  # float32 (H, W) metres
  instances: list[tuple[int, np.ndarray]]  # (category id, bool mask)
  crowd: list[tuple[int, np.ndarray]]


def _rays(height: int, width: int, pitch: float) -> np.ndarray:
  """World directions (H, W, 3) of camera rays whose camera z is 1 (y down)."""
  focal = _NYU_FOCAL * width / 640
  x = (np.arange(width) + 0.5 - width / 2) / focal
  y = (np.arange(height) + 0.5 - height / 2) / focal
  cam = np.stack(np.broadcast_arrays(x[None, :], y[:, None], 1.0), axis=-1)
  c, s = np.cos(pitch), np.sin(pitch)  # positive pitch looks down
  rot = np.array([[1, 0, 0], [0, c, s], [0, -s, c]])
  return cam @ rot.T


class _Hits:
  """Nearest-hit buffer: distance along the ray, normal, albedo, instance id."""

  def __init__(self, shape):
    self.t = np.full(shape, np.inf)
    self.normal = np.zeros(shape + (3,))
    self.albedo = np.zeros(shape + (3,))
    self.instance = np.full(shape, -1)

  def add(self, t, normal, albedo, instance=-1):
    closer = np.isfinite(t) & (t > 1e-6) & (t < self.t)
    self.t[closer] = t[closer]
    self.normal[closer] = np.broadcast_to(normal, closer.shape + (3,))[closer]
    self.albedo[closer] = np.broadcast_to(albedo, closer.shape + (3,))[closer]
    self.instance[closer] = instance


def _plane(rays, axis: int, offset: float):
  """Distance to the plane `coord[axis] = offset` from the origin."""
  with np.errstate(divide="ignore", invalid="ignore"):
    t = offset / rays[..., axis]
  return np.where(t > 0, t, np.inf)


def _sphere(rays, center, radius):
  a = np.einsum("...k,...k", rays, rays)
  b = -2 * rays @ center
  c = center @ center - radius ** 2
  disc = b * b - 4 * a * c
  with np.errstate(invalid="ignore"):
    t = (-b - np.sqrt(disc)) / (2 * a)
  t = np.where(disc >= 0, t, np.inf)
  normal = (rays * t[..., None] - center) / radius
  return t, normal


def _box(rays, lo, hi):
  """Slab test against an axis-aligned box; normal of the entry face."""
  with np.errstate(divide="ignore", invalid="ignore"):
    t1 = lo / rays
    t2 = hi / rays
  near = np.minimum(t1, t2)
  far = np.maximum(t1, t2)
  t_in = near.max(axis=-1)
  hit = (t_in <= far.min(axis=-1)) & (t_in > 0)
  face = near.argmax(axis=-1)
  normal = np.zeros(rays.shape)
  sign = -np.sign(np.take_along_axis(rays, face[..., None], axis=-1)[..., 0])
  np.put_along_axis(normal, face[..., None], sign[..., None], axis=-1)
  return np.where(hit, t_in, np.inf), normal


def render_scene(rng: np.random.Generator, height: int, width: int,
                 crowd_probability: float = 0.25) -> Scene:
  """One random room with 2-5 objects (and maybe a crowd of small balls)."""
  pitch = rng.uniform(0.05, 0.35)
  rays = _rays(height, width, pitch)
  cam_h = rng.uniform(1.1, 1.6)  # floor at y = cam_h (y points down)
  ceiling = cam_h - rng.uniform(2.4, 3.0)
  back = rng.uniform(3.5, 7.0)
  half_w = rng.uniform(1.6, 3.0)
  hits = _Hits((height, width))

  floor_t = _plane(rays, 1, cam_h)
  floor_p = rays * floor_t[..., None]
  tile = rng.uniform(0.3, 0.7)
  with np.errstate(invalid="ignore"):
    checker = (np.floor(floor_p[..., 0] / tile)
               + np.floor(floor_p[..., 2] / tile)) % 2
  floor_a, floor_b = rng.uniform(0.3, 0.9, 3), rng.uniform(0.1, 0.5, 3)
  hits.add(floor_t, (0, -1, 0),
           np.where(checker[..., None] > 0, floor_a, floor_b))
  hits.add(_plane(rays, 1, ceiling), (0, 1, 0), rng.uniform(0.7, 0.95, 3))
  hits.add(_plane(rays, 2, back), (0, 0, -1), rng.uniform(0.3, 0.9, 3))
  hits.add(_plane(rays, 0, -half_w), (1, 0, 0), rng.uniform(0.3, 0.9, 3))
  hits.add(_plane(rays, 0, half_w), (-1, 0, 0), rng.uniform(0.3, 0.9, 3))

  objects = []  # (category id, list of instance ids)
  for k in range(rng.integers(2, 6)):
    category = CATEGORIES[rng.integers(len(CATEGORIES))]["id"]
    z = rng.uniform(1.5, back - 0.6)
    half_view = z * 320 / _NYU_FOCAL  # half the visible width at depth z
    x = rng.uniform(-0.7, 0.7) * min(half_w - 0.4, half_view)
    albedo = rng.uniform(0.2, 1.0, 3)
    if category == 1:
      r = rng.uniform(0.2, 0.5)
      t, normal = _sphere(rays, np.array([x, cam_h - r, z]), r)
    else:
      size = (rng.uniform(0.3, 0.7, 3) if category == 2 else
              np.array([rng.uniform(0.2, 0.35), rng.uniform(1.0, 1.8),
                        rng.uniform(0.2, 0.35)]))
      lo = np.array([x - size[0] / 2, cam_h - size[1], z - size[2] / 2])
      t, normal = _box(rays, lo, lo + size)
    hits.add(t, normal, albedo, instance=k)
    objects.append((category, [k]))

  crowd = []
  if rng.random() < crowd_probability:
    z = rng.uniform(1.5, back - 0.6)
    x = rng.uniform(-0.5, 0.5) * min(half_w - 0.4, z * 0.4)
    members = []
    for j in range(rng.integers(5, 9)):
      r = rng.uniform(0.05, 0.1)
      center = np.array([x + rng.uniform(-0.4, 0.4), cam_h - r,
                         z + rng.uniform(-0.3, 0.3)])
      t, normal = _sphere(rays, center, r)
      hits.add(t, normal, rng.uniform(0.2, 1.0, 3), instance=100 + j)
      members.append(100 + j)
    crowd.append((1, members))

  point = rays * hits.t[..., None]
  light = np.array([rng.uniform(-1, 1), ceiling + 0.3, rng.uniform(1, back)])
  to_light = light - point
  dist = np.linalg.norm(to_light, axis=-1, keepdims=True)
  diffuse = np.clip(np.sum(hits.normal * to_light / dist, axis=-1,
                           keepdims=True), 0, None)
  shade = 0.25 + 1.6 * diffuse / (1 + 0.08 * dist ** 2)
  linear = np.clip(hits.albedo * shade, 0, 1)
  image = 255 * linear ** (1 / 2.2) + rng.normal(0, 1.5, linear.shape)
  depth = np.minimum(hits.t, _MAX_DEPTH).astype(np.float32)

  def mask_of(ids):
    return np.isin(hits.instance, ids)

  return Scene(
      image=np.clip(np.rint(image), 0, 255).astype(np.uint8), depth=depth,
      instances=[(c, mask_of(ids)) for c, ids in objects if mask_of(ids).any()],
      crowd=[(c, mask_of(ids)) for c, ids in crowd if mask_of(ids).any()])


# Hue of each category's shapes: the colour tells the category before the shape does.
_SHAPE_HUES = {1: (0.9, 0.2, 0.15), 2: (0.2, 0.8, 0.25), 4: (0.2, 0.35, 0.9)}


def render_shapes(rng: np.random.Generator, height: int, width: int,
                  max_shapes: int = 3) -> Scene:
  """1 to `max_shapes` flat shapes on a plain background: a disc (ball), a square
  (cube) or an upright 1:3 bar (pillar), in its category's hue at a random
  brightness; earlier shapes occlude later ones. Depth is a constant 1 m.

  A small model trained from scratch for minutes on CPU does not learn to find the
  objects of `render_scene`'s rooms. On these it does when there is one per image;
  with several, it learns last (and slowly) to choose which one its sequence begins
  with, since the objects come in random order.
  """
  image = np.empty((height, width, 3))
  image[:] = rng.uniform(0.35, 0.6) + rng.uniform(-0.05, 0.05, 3)
  yy, xx = np.mgrid[:height, :width] + 0.5
  owner = np.full((height, width), -1)
  categories = []
  for k in range(rng.integers(1, max_shapes + 1)):
    category = CATEGORIES[rng.integers(len(CATEGORIES))]["id"]
    half = rng.uniform(0.12, 0.3) * min(height, width)
    cy, cx = rng.uniform(half, height - half), rng.uniform(half, width - half)
    if category == 1:
      shape = (yy - cy) ** 2 + (xx - cx) ** 2 < half ** 2
    elif category == 2:
      shape = (abs(yy - cy) < half) & (abs(xx - cx) < half)
    else:
      shape = (abs(yy - cy) < half) & (abs(xx - cx) < half / 3)
    shape &= owner < 0
    image[shape] = np.array(_SHAPE_HUES[category]) * rng.uniform(0.75, 1.1)
    owner[shape] = k
    categories.append(category)
  image = 255 * np.clip(image, 0, 1) + rng.normal(0, 1.5, image.shape)
  instances = [(c, owner == k) for k, c in enumerate(categories)]
  return Scene(image=np.clip(np.rint(image), 0, 255).astype(np.uint8),
               depth=np.ones((height, width), np.float32),
               instances=[(c, m) for c, m in instances if m.any()], crowd=[])


def _outer_boundary(component: np.ndarray) -> list[float]:
  """Pixel-corner polygon around one 4-connected, hole-free component."""
  padded = np.pad(component, 1)
  nxt = {}
  rows, cols = np.nonzero(component)
  for r, c in zip(rows.tolist(), cols.tolist()):
    pr, pc = r + 1, c + 1
    if not padded[pr - 1, pc]:
      nxt[(c, r)] = (c + 1, r)
    if not padded[pr, pc + 1]:
      nxt[(c + 1, r)] = (c + 1, r + 1)
    if not padded[pr + 1, pc]:
      nxt[(c + 1, r + 1)] = (c, r + 1)
    if not padded[pr, pc - 1]:
      nxt[(c, r + 1)] = (c, r)
  start = min(nxt)
  points = [start]
  while (point := nxt[points[-1]]) != start:
    points.append(point)
  corners = [p for i, p in enumerate(points)
             if (points[i - 1][0] != points[(i + 1) % len(points)][0]
                 and points[i - 1][1] != points[(i + 1) % len(points)][1])]
  return [float(v) for p in corners for v in p]


def mask_to_polygons(mask: np.ndarray) -> list[list[float]] | None:
  """COCO polygons that pycocotools decodes back to `mask` exactly, or None."""
  if (ndimage.binary_fill_holes(mask) != mask).any():
    return None
  labels, count = ndimage.label(mask)
  polygons = [_outer_boundary(labels == k) for k in range(1, count + 1)]
  h, w = mask.shape
  decoded = mask_utils.decode(mask_utils.merge(
      mask_utils.frPyObjects(polygons, h, w)))
  return polygons if np.array_equal(decoded, mask.astype(np.uint8)) else None


def _rle(mask: np.ndarray, compressed: bool) -> dict:
  if compressed:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
  flat = mask.astype(np.uint8).flatten(order="F")
  changes = np.flatnonzero(np.diff(flat)) + 1
  bounds = np.concatenate([[0], changes, [flat.size]])
  counts = np.diff(bounds).tolist()
  if flat[0]:
    counts = [0] + counts
  return {"size": list(mask.shape), "counts": counts}


def _annotation(ann_id, image_id, category, mask, crowd):
  ys, xs = np.nonzero(mask)
  x0, y0 = int(xs.min()), int(ys.min())
  polygons = None if crowd else mask_to_polygons(mask)
  return {
      "id": ann_id, "image_id": image_id, "category_id": category,
      "iscrowd": int(crowd), "area": float(mask.sum()),
      "bbox": [float(x0), float(y0), float(xs.max() + 1 - x0),
               float(ys.max() + 1 - y0)],
      "segmentation": polygons if polygons else _rle(mask, not crowd),
  }


def _save_jpeg(image: np.ndarray, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(image).save(path, quality=95)


def write_nyu(out_dir: str, num_train: int, num_test: int, height: int = 480,
              width: int = 640, seed: int = 0) -> str:
  """Writes the NYU (BTS) layout; returns its root (`OUT/nyu_depth_v2`)."""
  root = os.path.join(out_dir, "nyu_depth_v2")
  focal = _NYU_FOCAL * width / 640
  for split, count, base in (("train", num_train, root),
                             ("test", num_test,
                              os.path.join(root, "official_splits", "test"))):
    lines = []
    for i in range(count):
      scene = render_scene(np.random.default_rng([seed, 0, split == "test", i]),
                           height, width)
      folder = f"/scene_{i // 4:03d}"
      rgb, depth = f"{folder}/rgb_{i:05d}.jpg", f"{folder}/sync_depth_{i:05d}.png"
      _save_jpeg(scene.image, base + rgb)
      millimetres = np.rint(scene.depth * 1000).astype(np.uint16)
      Image.fromarray(millimetres).save(base + depth)
      lines.append(f"{rgb} {depth} {focal:.4f}\n")
    with open(os.path.join(root, f"{split}_list.txt"), "w") as f:
      f.writelines(lines)
  return root


SCENES = {"rooms": render_scene, "shapes": render_shapes,
          "one_shape": functools.partial(render_shapes, max_shapes=1)}


def write_coco(out_dir: str, num_train: int, num_val: int, height: int = 480,
               width: int = 640, seed: int = 0, scenes: str = "rooms") -> str:
  """Writes the COCO layout (images + instances JSON) of `scenes` (a key of SCENES);
  returns `OUT/coco`."""
  if scenes not in SCENES:
    raise ValueError(f"synthetic scenes {scenes!r} are not one of {sorted(SCENES)}")
  root = os.path.join(out_dir, "coco")
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  ann_id = 1
  for split, count in (("train2017", num_train), ("val2017", num_val)):
    images, annotations = [], []
    for i in range(count):
      scene = SCENES[scenes](
          np.random.default_rng([seed, 1, split == "val2017", i]), height,
          width)
      image_id = i + 1
      file_name = f"{image_id:012d}.jpg"
      _save_jpeg(scene.image, os.path.join(root, split, file_name))
      images.append({"id": image_id, "file_name": file_name, "height": height,
                     "width": width})
      for crowd, items in ((False, scene.instances), (True, scene.crowd)):
        for category, mask in items:
          annotations.append(_annotation(ann_id, image_id, category, mask,
                                         crowd))
          ann_id += 1
    with open(os.path.join(root, "annotations", f"instances_{split}.json"),
              "w") as f:
      json.dump({"info": {"description": "ait-jax synthetic scenes"},
                 "licenses": [], "images": images,
                 "annotations": annotations, "categories": list(CATEGORIES)},
                f)
  return root


def generate(out_dir: str, num_train: int = 8, num_test: int = 4,
             height: int = 480, width: int = 640, seed: int = 0,
             coco_scenes: str = "rooms") -> dict:
  """Both layouts; returns {'nyu': root, 'coco': root}."""
  return {"nyu": write_nyu(out_dir, num_train, num_test, height, width, seed),
          "coco": write_coco(out_dir, num_train, num_test, height, width,
                             seed, scenes=coco_scenes)}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--num-train", type=int, default=8)
  parser.add_argument("--num-test", type=int, default=4)
  parser.add_argument("--height", type=int, default=480)
  parser.add_argument("--width", type=int, default=640)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--coco-scenes", choices=sorted(SCENES), default="rooms")
  args = parser.parse_args(argv)
  roots = generate(args.out, args.num_train, args.num_test, args.height,
                   args.width, args.seed, args.coco_scenes)
  print(json.dumps(roots))


if __name__ == "__main__":
  main()
