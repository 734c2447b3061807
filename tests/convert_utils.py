"""Helpers shared by the conversion tests (tests/test_convert.py and the conversion
section of tests/test_reference_parity.py)."""

import numpy as np

from ait_jax.checkpoint import mapping
from ait_jax.train import trainer

DEMO, DEMO_TOKENIZER = "configs/demo_depth.py", "configs/demo_vqvae_depth.py"


def load_config(path: str, model: dict | None = None, crop_size=None):
  cfg = trainer.load_config_file(path)
  with cfg.unlocked():
    if model is not None:
      cfg.model = model
    if crop_size is not None:
      cfg.tasks.depth.crop_size = tuple(crop_size)
  return cfg


def assert_state_dicts_equal(got: dict, want: dict, entries):
  """Parameters bit for bit; derived buffers exactly, float tables within their atol."""
  assert sorted(got) == sorted(want)
  atol = {e.torch_key: e.atol for e in entries if isinstance(e, mapping.Buffer)}
  for k, v in want.items():
    assert got[k].shape == v.shape and got[k].dtype == v.dtype, k
    if atol.get(k):
      np.testing.assert_allclose(got[k], v, rtol=0, atol=atol[k], err_msg=k)
    else:
      np.testing.assert_array_equal(got[k], v, err_msg=k)


def module_tree(layout: dict, torch, device: str = "cpu"):
  """A plain torch module with a tensor of each (shape, dtype) at each dotted key."""
  root = torch.nn.Module()
  for key, (shape, dtype) in layout.items():
    *path, name = key.split(".")
    node = root
    for part in path:
      if not hasattr(node, part):
        node.add_module(part, torch.nn.Module())
      node = getattr(node, part)
    node.register_buffer(name, torch.empty(tuple(shape), device=device,
                                           dtype=getattr(torch, np.dtype(dtype).name)))
  return root
