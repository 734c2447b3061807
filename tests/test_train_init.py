"""Parts of the model from reference weight files: config.init.backbone, a tokenizer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ait_jax.checkpoint import mapping
from ait_jax.checkpoint.ait import ait_from_reference_config
from ait_jax.checkpoint.swin_v2 import swin_v2_entries
from ait_jax.train import testing, trainer


def test_backbone_and_tokenizer_from_reference_files(tmp_path):
  workspace = testing.make_workspace(str(tmp_path))
  cfg = trainer.load_config_file(testing.TINY_CONFIG)
  backbone = ait_from_reference_config(cfg.model.to_dict()).model.backbone
  variables = nn.meta.unbox(backbone.init(jax.random.key(3), jnp.zeros((1, 8, 8, 3))))
  state_dict = mapping.to_torch({"params": variables["params"]}, swin_v2_entries(backbone))
  # As the reference's SimMIM files: `encoder.` keys, derived tables included.
  path = str(tmp_path / "swin.npz")
  np.savez(path, **{f"encoder.{k}": v for k, v in state_dict.items()})
  with cfg.unlocked():
    cfg.update_from_flattened_dict({
        "init.backbone": path, "data.synthetic_dir": workspace["data"],
        "tokenizers.depth.checkpoint": workspace["tokenizer"]})
  run = trainer.Run(cfg, str(tmp_path / "run"))
  state = run.factory.create()
  got = jax.tree.leaves(state.params["backbone"])
  want = jax.tree.leaves(variables["params"])
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  # The transformer keeps its own initialisation; the tokenizer came from the .npz.
  assert set(state.params) == {"backbone", "transformer"}
  tok = np.load(workspace["tokenizer"])
  np.testing.assert_array_equal(
      np.asarray(run.frozen["depth"]["vq"]["quantizer"]["embedding"]),
      tok["_vq_vae._embedding"])
  run.close()


def test_model_from_an_ait_jax_workdir(tmp_path):
  """config.init.model may name a stage-2 workdir (e.g. detection before instance
  segmentation): its latest weights replace the seed's initialisation."""
  workspace = testing.make_workspace(str(tmp_path))
  cfg = trainer.load_config_file(testing.TINY_CONFIG)
  with cfg.unlocked():
    cfg.update_from_flattened_dict({"data.synthetic_dir": workspace["data"],
                                    "tokenizers.depth.checkpoint": workspace["tokenizer"]})
  pretrained_dir = str(tmp_path / "pretrained")
  run = trainer.Run(cfg, pretrained_dir)
  want = run.factory.create()
  trainer.write_config(cfg, pretrained_dir)
  run.checkpointer.save(5, want, {})
  run.checkpointer.wait_until_finished()
  run.close()
  with cfg.unlocked():
    cfg.seed += 1  # a different initialisation, unless the workdir's weights replace it
    cfg.init.model = pretrained_dir
  run = trainer.Run(cfg, str(tmp_path / "run"))
  got = run.factory.create()
  run.close()
  pairs = list(zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)))
  assert len(pairs) == len(jax.tree.leaves(want.params))
  for g, w in pairs:
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
