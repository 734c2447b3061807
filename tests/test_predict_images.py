"""`python -m ait_jax.main --mode predict --input PATH --output DIR` on image files."""

import os

import numpy as np
import pytest
from PIL import Image

from ait_jax.train import testing
from input_pipeline import sources_images
from input_pipeline.errors import DataError

SIZES = {"wide": (50, 70), "square": (64, 64)}  # stem -> (height, width)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny depth workdir after one training step, and its flags and environment."""
  root = tmp_path_factory.mktemp("predict_images")
  workspace = testing.make_workspace(str(root))
  flags = testing.tiny_flags(workspace, total_steps=1, **{"checkpoint.every_steps": 1})
  env = testing.subprocess_env(workspace)
  workdir = str(root / "run")
  testing.run_main(workdir, flags, env)
  return workdir, flags, env


def _write_images(folder) -> None:
  folder.mkdir()
  rng = np.random.default_rng(0)
  for stem, (h, w) in SIZES.items():
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / f"{stem}.{'png' if h != w else 'jpg'}")
  (folder / "notes.txt").write_text("not an image")


def test_depth_on_images_of_any_size(trained, tmp_path):
  workdir, flags, env = trained
  _write_images(tmp_path / "images")
  out = tmp_path / "out"
  proc = testing.run_main(workdir, flags + ["--mode=predict",
                                            f"--input={tmp_path / 'images'}",
                                            f"--output={out}"], env)
  assert f"wrote 2 predictions under {out}" in proc.stdout
  assert sorted(os.listdir(out)) == sorted(
      f"{stem}{suffix}" for stem in SIZES
      for suffix in ("_depth_mm.png", "_depth_color.png", "_depth.npy"))
  for stem, size in SIZES.items():
    metres = np.load(out / f"{stem}_depth.npy")
    mm = np.asarray(Image.open(out / f"{stem}_depth_mm.png"))
    color = np.asarray(Image.open(out / f"{stem}_depth_color.png"))
    assert metres.shape == mm.shape == color.shape[:2] == size
    assert metres.dtype == np.float32 and mm.dtype == np.uint16 and color.shape[2] == 3
    assert np.isfinite(metres).all() and metres.min() > 0
    np.testing.assert_array_equal(
        mm, np.clip(np.rint(metres.astype(np.float64) * 1000), 0, 65535))


def test_corrupt_image_is_an_error_naming_it(trained, tmp_path):
  workdir, flags, env = trained
  folder = tmp_path / "images"
  folder.mkdir()
  (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  proc = testing.run_main(workdir, flags + ["--mode=predict", f"--input={folder}",
                                            f"--output={tmp_path / 'out'}"], env,
                          check=False)
  assert proc.returncode != 0
  assert f"{folder / 'broken.png'}: cannot decode image" in proc.stderr


def test_image_source(tmp_path):
  with pytest.raises(DataError, match="holds no"):
    sources_images.ImageFileSource(str(tmp_path))
  with pytest.raises(DataError, match="no such"):
    sources_images.ImageFileSource(str(tmp_path / "missing"))
  _write_images(tmp_path / "images")
  (tmp_path / "images" / "sub.png").mkdir()  # folders are not images
  source = sources_images.ImageFileSource(str(tmp_path / "images"))
  assert source.stems == ["square", "wide"] and len(source) == 2
  assert source[1]["image"].shape == SIZES["wide"] + (3,)
  single = sources_images.ImageFileSource(source.paths[0])
  assert single.stems == ["square"] and single[0]["image"].dtype == np.uint8
  Image.fromarray(source[0]["image"]).save(tmp_path / "images" / "square.png")
  with pytest.raises(DataError, match="share the stem"):
    sources_images.ImageFileSource(str(tmp_path / "images"))
