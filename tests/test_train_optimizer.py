"""The optimizer's schedules, layer decay and update rule against closed forms."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ait_jax.train import config_base
from ait_jax.train import optimizer as optimizer_lib


def _with(cfg, kw):
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.update(kw)
  return cfg


def test_step_schedule_with_mmcv_warmup():
  cfg = _with(config_base.ait_config().schedule,
              dict(name="step", boundaries=(18180,), gamma=0.1, warmup_steps=500,
                   warmup_ratio=0.1))
  fn = optimizer_lib.make_schedule(cfg, 2e-4, 25250)
  for t in (0, 1, 250, 499):
    want = 2e-4 * (1 - (1 - t / 500) * (1 - 0.1))
    assert math.isclose(float(fn(t)), want, rel_tol=1e-6)
  assert math.isclose(float(fn(500)), 2e-4, rel_tol=1e-6)
  assert math.isclose(float(fn(18179)), 2e-4, rel_tol=1e-6)
  assert math.isclose(float(fn(18180)), 2e-5, rel_tol=1e-6)


def test_linear_annealing_schedule():
  cfg = _with(config_base.ait_config().schedule,
              dict(name="linear_annealing", min_lr_ratio=0.01, warmup_steps=100,
                   warmup_ratio=0.1))
  fn = optimizer_lib.make_schedule(cfg, 1e-3, 1000)
  regular = lambda t: 1e-3 + (1e-5 - 1e-3) * t / 1000
  assert math.isclose(float(fn(50)), regular(50) * (1 - 0.5 * 0.9), rel_tol=1e-5)
  assert math.isclose(float(fn(600)), regular(600), rel_tol=1e-5)


def test_exp_schedule_steps_every_interval_of_each_epoch():
  cfg = _with(config_base.ait_config().schedule,
              dict(name="exp", decay_rate=0.98, decay_interval=500, steps_per_epoch=1200))
  fn = optimizer_lib.make_schedule(cfg, 3e-4, 10_000)
  # ExponentialLR.step() after iterations 0, 500, 1000 of each epoch.
  expected = {0: 0, 1: 1, 500: 1, 501: 2, 1001: 3, 1199: 3, 1200: 3, 1201: 4}
  for t, count in expected.items():
    assert math.isclose(float(fn(t)), 3e-4 * 0.98 ** count, rel_tol=1e-6), t


def test_cosine_schedule_like_timm():
  cfg = _with(config_base.ait_config().schedule,
              dict(name="cosine", warmup_steps=10, warmup_ratio=1e-3, lr_min=1e-6))
  fn = optimizer_lib.make_schedule(cfg, 3e-4, 100)
  init = 3e-7
  assert math.isclose(float(fn(0)), init, rel_tol=1e-5)
  assert math.isclose(float(fn(6)), init + 5 * (3e-4 - init) / 10, rel_tol=1e-5)
  u = 50
  want = 1e-6 + 0.5 * (3e-4 - 1e-6) * (1 + math.cos(math.pi * u / 100))
  assert math.isclose(float(fn(u + 1)), want, rel_tol=1e-5)


def test_layer_ids_follow_the_reference():
  depths = (2, 2, 18, 2)
  assert optimizer_lib.layers_per_stage(depths) == [3, 3, 19, 2]
  assert optimizer_lib.layer_id(("backbone", "patch_embed", "proj", "kernel"), depths) == 0
  assert optimizer_lib.layer_id(("backbone", "layers_0", "blocks_0", "mlp"), depths) == 1
  assert optimizer_lib.layer_id(("backbone", "layers_0", "downsample", "x"), depths) == 3
  assert optimizer_lib.layer_id(("backbone", "layers_2", "blocks_5", "x"), depths) == 12
  assert optimizer_lib.layer_id(("backbone", "layers_3", "blocks_1", "x"), depths) == 27
  assert optimizer_lib.layer_id(("backbone", "norm3", "scale"), depths) == 28
  assert optimizer_lib.layer_id(("transformer", "voc_embed"), depths) == 28


def _tiny_params():
  return {"backbone": {"patch_embed": {"proj": {"kernel": jnp.ones((2, 2, 3, 4)),
                                                "bias": jnp.ones((4,))}},
                       "layers_0": {"blocks_0": {"attn": {
                           "rpe_hidden": {"kernel": jnp.ones((2, 8))},
                           "logit_scale": jnp.ones((2,)),
                           "qkv": {"kernel": jnp.ones((4, 12))}}}}},
          "transformer": {"voc_embed": jnp.ones((10, 4)),
                          "proj": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros((4,))}}}


def test_decay_mask_uses_reference_names():
  mask = optimizer_lib.decay_mask(_tiny_params(), config_base.NO_DECAY_NAMES)
  flat = {"/".join(str(k.key) for k in p): v
          for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat == {
      "backbone/patch_embed/proj/kernel": True, "backbone/patch_embed/proj/bias": False,
      "backbone/layers_0/blocks_0/attn/rpe_hidden/kernel": False,
      "backbone/layers_0/blocks_0/attn/logit_scale": False,
      "backbone/layers_0/blocks_0/attn/qkv/kernel": True,
      "transformer/voc_embed": False, "transformer/proj/kernel": True,
      "transformer/proj/bias": False}


def test_update_is_torch_adamw_with_scaled_lr():
  """One step: p - lr * scale * (adam(g) + wd * p) for decayed leaves, no wd else."""
  cfg = config_base.ait_config()
  cfg.optimizer.update(lr=0.1, weight_decay=0.5, grad_clip_norm=0.0, layer_decay_rate=0.5,
                       layer_decay_depths=(1,))
  params = _tiny_params()
  tx, _ = optimizer_lib.make_optimizer(cfg, params, 10)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  scales = optimizer_lib.lr_scales(params, (1,), 0.5)
  mask = optimizer_lib.decay_mask(params, cfg.optimizer.no_decay_names)
  adam = 0.3 / (math.sqrt(0.09) + 1e-8)  # first step: m_hat / (sqrt(v_hat) + eps)
  for p, n, s, m in zip(*(jax.tree.leaves(t) for t in (params, new, scales, mask))):
    want = np.asarray(p) - 0.1 * s * (adam + (0.5 * np.asarray(p) if m else 0.0))
    # float32 bias corrections (1 - 0.999 ** t) leave ~1e-5 relative.
    np.testing.assert_allclose(np.asarray(n), want, rtol=2e-5)
  # num_layers = (1) + 2 = 3: patch_embed 0.5^2, layers_0/blocks_0 0.5^1, the rest 1.
  assert jax.tree.leaves(scales["backbone"]["patch_embed"]) == [0.25, 0.25]


def test_unknown_schedule_is_an_error():
  cfg = _with(config_base.ait_config().schedule, dict(name="poly"))
  with pytest.raises(ValueError, match="poly"):
    optimizer_lib.make_schedule(cfg, 1.0, 10)
