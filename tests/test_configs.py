"""Every experiment config builds (with `jax.eval_shape` only, no allocation), and each
AiT config's tokenizer config trains the tokenizer its `vae_cfg` describes.

That the full-size configs are the reference's models (their manifests and vocabulary
offsets) is checked in tests/test_reference_parity.py.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from ait_jax.checkpoint.ait import ait_from_reference_config
from ait_jax.checkpoint.vqvae import vqvae_from_reference_kwargs
from ait_jax.train import optimizer as optimizer_lib
from ait_jax.train import testing
from ait_jax.train import trainer

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))
REFERENCE_NAMES = ("swinv2b_480reso_depthonly", "swinv2b_480reso_parallel_depthonly",
                   "swinv2l_480reso_depthonly", "swinv2l_480reso_parallel_depthonly",
                   "swinv2b_480reso_depthonly_wosoft", "swinv2b_640reso_detonly",
                   "swinv2b_640reso_inssegonly", "swinv2b_640reso_inssegonly_wosoft",
                   "swinv2b_640reso_joint")
REFERENCE_TOKENIZER_NAMES = {"vqvae_depth": "ait_depth_vqvae",
                             "vqvae_insseg": "ait_insseg_vqvae"}


def _abstract(module, *args):
  return nn.meta.unbox(jax.eval_shape(
      lambda: module.init(jax.random.key(0), *args)))


def _tokenizer_vars(tok):
  maps = jnp.zeros((1, tok.mask_size, tok.mask_size), jnp.float32)
  return {k: v for k, v in _abstract(tok, maps).items() if k in ("params", "vq")}


def _shapes(tree):
  return jax.tree.map(lambda x: tuple(x.shape), tree)


def test_every_reference_config_exists():
  names = {p.stem for p in CONFIGS}
  for name in REFERENCE_NAMES + tuple(REFERENCE_TOKENIZER_NAMES):
    assert name in names, f"configs/{name}.py is missing"
  for name in ("demo_depth", "demo_insseg", "demo_joint", "demo_vqvae_depth",
               "demo_vqvae_insseg"):
    assert name in names, f"configs/{name}.py is missing"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds(path):
  cfg = trainer.load_config_file(str(path))
  assert cfg.is_locked
  with pytest.raises(AttributeError):
    cfg.no_such_key = 1
  if path.stem in REFERENCE_NAMES + tuple(REFERENCE_TOKENIZER_NAMES):
    name = REFERENCE_TOKENIZER_NAMES.get(path.stem, path.stem)
    assert name in path.read_text().split('"""')[1], "the docstring names it"
  if cfg.stage == "ait":
    ref = ait_from_reference_config(cfg.model.to_dict())
    model_vars = _abstract(ref.model, jnp.zeros((1, 32, 32, 3)),
                           jnp.zeros((1, 1), jnp.int32), jnp.zeros((1,), jnp.int32))
    tok_vars = {t: _tokenizer_vars(tok) for t, tok in ref.tokenizers.items()}
    assert set(cfg.tasks) <= set(ref.task_heads)
    for task in cfg.tasks:
      if task in ref.tokenizers:
        source = cfg.tokenizers[task]
        stage1 = trainer.load_config_file(source.config)
        built = vqvae_from_reference_kwargs(stage1.model.to_dict(), "train")
        assert _shapes(_tokenizer_vars(built)) == _shapes(tok_vars[task]), (
            f"{source.config} does not train the tokenizer of {path.name}")
    params = model_vars["params"]
  else:
    tok = vqvae_from_reference_kwargs(cfg.model.to_dict(), "train")
    params = _tokenizer_vars(tok)["params"]
  tx, schedule = optimizer_lib.make_optimizer(cfg, params, cfg.total_steps)
  assert math.isfinite(float(schedule(cfg.total_steps - 1)))
  jax.eval_shape(tx.init, params)


def test_unknown_override_is_an_error_naming_the_key(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "ait_jax.main", "--config=configs/tiny_depth.py",
       f"--workdir={tmp_path}", "--config.optimizer.no_such_option=3"],
      cwd=testing.REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PYTHONPATH=testing.REPO))
  assert proc.returncode != 0
  assert "no_such_option" in proc.stderr
  assert not os.path.exists(tmp_path / "config.json")
