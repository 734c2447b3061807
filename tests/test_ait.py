"""The AiT composition and the full reference state_dict mapping."""

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ait_jax.checkpoint import mapping
from ait_jax.checkpoint.ait import ait_entries, ait_from_reference_config
from ait_jax.models import axes
from ait_jax.models.transformer import DEPTH_TASK, INSSEG_TASK

jax.config.update("jax_default_matmul_precision", "highest")

VAE = dict(type="VQVAE", token_length=16, mask_size=32, embedding_dim=8, hidden_dim=16,
           num_resnet_blocks=1, num_embeddings=8, pretrained="unused.pt", freeze=True)
TINY = dict(
    type="AiT",
    backbone=dict(type="SwinV2TransformerRPE2FC", embed_dim=8, depths=[1, 1, 1, 1],
                  num_heads=[1, 1, 2, 2], window_size=[4, 4, 4, 2],
                  pretrain_window_size=[4, 4, 4, 2], use_shift=[True, True, False, False],
                  drop_path_rate=0.0, out_indices=(3,)),
    transformer=dict(type="ARTransformer", in_chans=64, d_model=16, nhead=2,
                     num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
                     drop_path=0.0, drop_out=0.0, num_vocal=60, num_bins=20, num_classes=3,
                     num_embeddings=8, num_embeddings_depth=8, dec_length=20, n_rows=4,
                     n_cols=4, soft_vae=True, soft_transformer=True, top_p=0.0),
    task_heads=dict(
        insseg=dict(type="InsSegHead", task_id=1, mask_weight=0.2, vae_cfg=dict(VAE)),
        depth=dict(type="DepthHead", task_id=2, vae_cfg={**VAE, "use_norm": False})),
)


@pytest.fixture(scope="module")
def tiny():
  ref = ait_from_reference_config(TINY)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 128, 128, 3)), jnp.float32)
  seq = jnp.asarray([[1, 2, 3], [4, 5, 6]], jnp.int32)
  task = jnp.asarray([DEPTH_TASK, INSSEG_TASK], jnp.int32)
  variables = {"model": nn.meta.unbox(ref.model.init(jax.random.key(1), images, seq, task))}
  variables["tokenizers"] = {
      t: nn.meta.unbox(tok.init(jax.random.key(2), jnp.zeros((1, 32, 32))))
      for t, tok in ref.tokenizers.items()}
  return ref, variables, images, seq, task


def test_forward_is_transformer_over_backbone(tiny):
  ref, variables, images, seq, task = tiny
  params = variables["model"]
  logits = ref.model.apply(params, images, seq, task)
  feats = ref.model.backbone.apply({"params": params["params"]["backbone"]}, images)[0]
  assert feats.shape == (2, 4, 4, 64)
  direct = ref.model.transformer.apply({"params": params["params"]["transformer"]}, feats,
                                       seq, task)
  assert logits.shape == (2, 4, 60)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(direct))


def test_decode_depth_shapes_and_range(tiny):
  ref, variables, images, _, _ = tiny
  pred = ref.model.apply(variables["model"], images, 16, method="decode_depth")
  assert pred.logits.shape == (2, 16, 8) and pred.tokens.shape == (2, 16)
  np.testing.assert_array_equal(np.asarray(pred.tokens),
                                np.argmax(np.asarray(pred.logits), -1))


def test_full_state_dict_round_trip(tiny):
  ref, variables, _, _, _ = tiny
  entries = ait_entries(ref)
  sd = mapping.to_torch(variables, entries)
  prefixes = sorted({k.split(".")[0] for k in sd})
  assert prefixes == ["backbone", "depth_head", "insseg_head", "transformer"]
  # The shared transformer is written once per head, as the reference registers it.
  assert np.array_equal(sd["transformer.voc_embed"], sd["depth_head.transformer.voc_embed"])
  w = sd["insseg_head.loss_seq.weight"]
  assert w.shape == (60,) and w[0] == 1.0 and w[ref.model.transformer.vocab.mask_offset] == \
      np.float32(0.2)
  back = mapping.to_flax(sd, entries)
  flat_a, flat_b = mapping.flatten(variables), mapping.flatten(back)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[k]), flat_b[k], err_msg="/".join(k))


def test_disagreeing_transformer_copies_are_reported(tiny):
  ref, variables, _, _, _ = tiny
  entries = ait_entries(ref)
  sd = mapping.to_torch(variables, entries)
  sd["depth_head.transformer.outp_bias"] = sd["depth_head.transformer.outp_bias"] + 1
  with pytest.raises(mapping.StateDictMismatch, match="depth_head.transformer.outp_bias"):
    mapping.to_flax(sd, entries)


def test_config_errors_name_the_problem():
  cfg = copy.deepcopy(TINY)
  cfg["transformer"]["in_chans"] = 32
  with pytest.raises(ValueError, match="in_chans=32.*64 channels"):
    ait_from_reference_config(cfg)
  cfg = copy.deepcopy(TINY)
  cfg["task_heads"]["panoptic"] = {"type": "PanopticHead"}
  with pytest.raises(ValueError, match="panoptic"):
    ait_from_reference_config(cfg)
  with pytest.raises(ValueError, match="unknown AiT options: bogus"):
    ait_from_reference_config({**TINY, "bogus": 1})


def test_every_variable_has_logical_axis_names(tiny):
  """Every parameter and codebook buffer is boxed with one known name per dimension."""
  ref, _, images, seq, task = tiny
  trees = {"model": jax.eval_shape(lambda *a: ref.model.init(jax.random.key(0), *a),
                                   images, seq, task)}
  for t, tok in ref.tokenizers.items():
    trees[t] = jax.eval_shape(lambda x, tok=tok: tok.init(jax.random.key(0), x),
                              jnp.zeros((1, 32, 32)))
  leaves = jax.tree_util.tree_leaves_with_path(
      trees, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert len(leaves) > 50
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.Partitioned), f"{name} carries no logical axis names"
    assert len(leaf.names) == leaf.value.ndim, f"{name}: {leaf.names} for {leaf.value.shape}"
    assert set(leaf.names) <= axes.ALL, f"{name}: unknown names {leaf.names}"
