"""The synthetic generator: real formats, exact depth and masks, learnable images."""

import collections
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

import input_pipeline as ip
from input_pipeline import synthetic

from ait_jax.train import config_base
from ait_jax.train import data as train_data

# pycocotools objects trigger a numpy 2 DeprecationWarning on every decode.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning")


def test_cli_writes_both_layouts_that_the_sources_read(tmp_path):
  synthetic.main(["--out", str(tmp_path), "--num-train", "3", "--num-test",
                  "2", "--height", "40", "--width", "56", "--seed", "1",
                  "--coco-scenes", "shapes"])
  root = tmp_path / "nyu_depth_v2"
  train, test = ip.NyuDepthSource(str(root)), ip.NyuDepthSource(str(root),
                                                                 "test")
  assert (len(train), len(test)) == (3, 2)
  record = test[1]
  assert record["image"].shape == (40, 56, 3)
  assert record["depth"].dtype == np.float32
  assert 0.3 < record["depth"].min() and record["depth"].max() <= 9.9
  coco = tmp_path / "coco"
  for split, count in (("train2017", 3), ("val2017", 2)):
    ann = str(coco / "annotations" / f"instances_{split}.json")
    source = ip.CocoInstancesSource(ann, str(coco / split), train=False)
    assert len(source) == count and source[0]["image"].shape == (40, 56, 3)


def test_generation_is_deterministic_and_depth_png_is_millimetres(tmp_path):
  a = synthetic.write_nyu(str(tmp_path / "a"), 2, 0, 32, 40, seed=3)
  b = synthetic.write_nyu(str(tmp_path / "b"), 2, 0, 32, 40, seed=3)
  depth_a = np.asarray(Image.open(a + "/scene_000/sync_depth_00001.png"))
  depth_b = np.asarray(Image.open(b + "/scene_000/sync_depth_00001.png"))
  np.testing.assert_array_equal(depth_a, depth_b)
  scene = synthetic.render_scene(np.random.default_rng([3, 0, False, 1]), 32,
                                 40)
  np.testing.assert_array_equal(depth_a, np.rint(scene.depth * 1000))


@pytest.mark.parametrize("scenes", ["rooms", "shapes", "one_shape"])
def test_coco_annotations_are_exact(tmp_path, scenes):
  coco = synthetic.write_coco(str(tmp_path), 6, 0, 48, 64, seed=0, scenes=scenes)
  content = json.load(open(os.path.join(coco, "annotations",
                                        "instances_train2017.json")))
  assert content["annotations"]
  kinds = set()
  for ann in content["annotations"]:
    seg = ann["segmentation"]
    kinds.add("polygon" if isinstance(seg, list) else
              "crowd-rle" if ann["iscrowd"] else "rle")
    rle = (mask_utils.merge(mask_utils.frPyObjects(seg, 48, 64))
           if isinstance(seg, list) else
           mask_utils.frPyObjects(seg, 48, 64) if ann["iscrowd"] else
           {"size": seg["size"], "counts": seg["counts"].encode()})
    mask = mask_utils.decode(rle)
    ys, xs = np.nonzero(mask)
    assert ann["area"] == mask.sum()
    assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(),
                           ys.max() + 1 - ys.min()]
  assert "polygon" in kinds
  assert {c["id"] for c in content["categories"]} == {1, 2, 4}


def test_unknown_scenes_are_named(tmp_path):
  with pytest.raises(ValueError, match="'cubes' are not one of.*rooms"):
    synthetic.write_coco("/nonexistent", 1, 0, scenes="cubes")
  data_cfg = config_base.ait_config().data
  data_cfg.synthetic.coco_scenes = "cubes"
  with pytest.raises(ValueError, match=r"config.data.synthetic.coco_scenes 'cubes' is "
                     r"not one of \['one_shape', 'rooms', 'shapes'\]"):
    train_data.synthetic_root(data_cfg, str(tmp_path), "coco")
  assert not os.listdir(tmp_path)


def test_shapes_are_their_category_in_its_hue():
  """Unoccluded, a ball is a disc (pi/4 of its square box), a cube a square, a
  pillar a bar three times as tall as wide; its colour is its category's hue."""
  seen = set()
  for seed in range(30):
    scene = synthetic.render_shapes(np.random.default_rng(seed), 120, 160)
    assert not scene.crowd and 1 <= len(scene.instances) <= 3
    covered = np.zeros((120, 160), bool)
    for _, mask in scene.instances:
      assert not (covered & mask).any()
      covered |= mask
    for category, mask in scene.instances:
      colour = np.median(scene.image[mask], axis=0)
      assert np.argmax(colour) == {1: 0, 2: 1, 4: 2}[category]
      ys, xs = np.nonzero(mask)
      h, w = ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()
      if (ndimage.binary_dilation(mask) & ~mask & covered).any():
        continue  # it may be occluded
      seen.add(category)
      fill = mask.sum() / (h * w)
      if category == 1:
        assert abs(h - w) <= 1 and abs(fill - np.pi / 4) < 0.05
      elif category == 2:
        assert abs(h - w) <= 1 and fill == 1
      else:
        assert abs(h / w - 3) < 0.4 and fill == 1
  assert seen == {1, 2, 4}


def test_shape_scenes_hold_one_to_three_objects_or_one(tmp_path):
  counts = {len(synthetic.render_shapes(np.random.default_rng(seed), 60, 80).instances)
            for seed in range(30)}
  assert counts == {1, 2, 3}
  coco = synthetic.write_coco(str(tmp_path), 12, 0, 60, 80, scenes="one_shape")
  content = json.load(open(os.path.join(coco, "annotations", "instances_train2017.json")))
  per_image = collections.Counter(a["image_id"] for a in content["annotations"])
  assert sorted(per_image) == list(range(1, 13)) and set(per_image.values()) == {1}


def test_scene_masks_are_the_rendered_objects():
  rng = np.random.default_rng(5)
  scene = synthetic.render_scene(rng, 60, 80, crowd_probability=1.0)
  assert scene.instances and scene.crowd
  union = np.zeros((60, 80), int)
  for _, mask in scene.instances + scene.crowd:
    union += mask
  assert union.max() == 1  # instances never overlap
  # Objects stand in the room, in front of what surrounds them.
  for _, mask in scene.instances:
    ring = ndimage.binary_dilation(mask, iterations=2) & ~mask
    if ring.any() and not (ring & (union > 0)).any():
      assert np.median(scene.depth[mask]) < np.median(scene.depth[ring])


def test_images_show_the_geometry():
  """Image edges sit on depth and instance edges: the image carries them."""
  on, off = [], []
  for seed in range(4):
    scene = synthetic.render_scene(np.random.default_rng(seed), 96, 128)
    grey = scene.image.astype(float).mean(-1)
    gradient = np.hypot(*np.gradient(grey))
    depth_edge = np.hypot(*np.gradient(scene.depth)) > 0.15
    edges = depth_edge.copy()
    for _, mask in scene.instances:
      edges |= ndimage.binary_dilation(mask) & ~mask
    on.append(gradient[edges].mean())
    off.append(gradient[~ndimage.binary_dilation(edges, iterations=2)].mean())
  assert np.mean(on) > 3 * np.mean(off)


def test_polygon_tracing_round_trips_or_declines():
  rng = np.random.default_rng(0)
  for _ in range(20):
    blob = ndimage.binary_opening(rng.random((24, 30)) > 0.45)
    blob = ndimage.binary_fill_holes(blob)
    if not blob.any():
      continue
    polygons = synthetic.mask_to_polygons(blob)
    assert polygons is not None
    decoded = mask_utils.decode(mask_utils.merge(
        mask_utils.frPyObjects(polygons, 24, 30)))
    np.testing.assert_array_equal(decoded, blob)
  ring = np.zeros((10, 10), bool)
  ring[2:8, 2:8] = True
  ring[4:6, 4:6] = False
  assert synthetic.mask_to_polygons(ring) is None


def test_synthetic_data_made_from_other_settings_is_refused(tmp_path):
  data_cfg = config_base.ait_config().data
  data_cfg.synthetic.update(num_train=2, num_test=1, height=24, width=32)
  root = train_data.synthetic_root(data_cfg, str(tmp_path), "coco")
  assert len(os.listdir(os.path.join(root, "train2017"))) == 2
  assert train_data.synthetic_root(data_cfg, str(tmp_path), "coco") == root
  data_cfg.synthetic.num_train = 3
  with pytest.raises(ValueError, match="data/synthetic was generated with .*'num_train': 2"):
    train_data.synthetic_root(data_cfg, str(tmp_path), "coco")
  data_cfg.synthetic.update(num_train=2, coco_scenes="shapes")
  with pytest.raises(ValueError, match="generated with .*'scenes': 'rooms'.* asks for "
                     ".*'scenes': 'shapes'"):
    train_data.synthetic_root(data_cfg, str(tmp_path), "coco")
