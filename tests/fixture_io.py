"""Reading reference fixtures (`AIT_FIXTURES`, default ../shared/fixtures) and comparing.

The format is described in the fixtures' README: `NAME_config.json` (with
`fixture_kind`), `NAME_state_dict.npz`, `NAME_io.npz`.
"""

import dataclasses
import functools
import json
import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def fixtures_dir() -> Path:
  return Path(os.environ.get("AIT_FIXTURES", REPO.parent / "shared" / "fixtures"))


@dataclasses.dataclass
class Fixture:
  config_path: Path

  @functools.cached_property
  def config(self) -> dict:
    return json.loads(self.config_path.read_text())

  @property
  def kind(self) -> str:
    return self.config["fixture_kind"]

  @property
  def name(self) -> str:
    return self.config["fixture_name"]

  def _npz(self, suffix: str) -> dict[str, np.ndarray]:
    path = self.config_path.parent / f"{self.name}_{suffix}.npz"
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}

  @functools.cached_property
  def io(self) -> dict[str, np.ndarray]:
    return self._npz("io")

  @functools.cached_property
  def state_dict(self) -> dict[str, np.ndarray]:
    return self._npz("state_dict")

  def extra_state_dict(self, tag: str) -> dict[str, np.ndarray]:
    return self._npz(f"{tag}_state_dict")


def kind_fixtures() -> list[Fixture]:
  """Every fixture config in the directory, whatever its file name."""
  out = []
  for path in sorted(fixtures_dir().glob("*.json")):
    try:
      cfg = json.loads(path.read_text())
    except json.JSONDecodeError:
      continue
    if isinstance(cfg, dict) and "fixture_kind" in cfg:
      out.append(Fixture(path))
  return out


def assert_close(name: str, got, want, *, atol: float = 0.0, rtol: float = 0.0):
  """Compare one array, printing its largest difference (pytest -s shows them)."""
  got = np.asarray(got)
  want = np.asarray(want)
  assert got.shape == want.shape, f"{name}: shape {got.shape} != reference {want.shape}"
  if want.dtype.kind in "iub":
    ndiff = int(np.sum(got != want))
    print(f"  {name}: {ndiff} of {want.size} differ")
    assert ndiff == 0, f"{name}: {ndiff} of {want.size} entries differ"
    return
  diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
  finite = np.isfinite(want)
  assert np.array_equal(np.isfinite(got), finite), f"{name}: non-finite entries differ"
  err = float(diff[finite].max()) if finite.any() else 0.0
  rel = float((diff[finite] / np.maximum(np.abs(want[finite]), 1e-30)).max()) \
      if finite.any() else 0.0
  print(f"  {name}: max abs diff {err:.3g}, max rel diff {rel:.3g}")
  np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=name)
