"""Unit tests of the SwinV2 backbone and its reference weight mapping.

Compiling is the cost on a 2-core machine: variables are drawn from abstract shapes
(no jitted init), and one jitted eval pass of the tiny model is shared.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ait_jax.checkpoint.mapping import (Buffer, StateDictMismatch, check_covers,
                                        flatten, to_flax, to_torch, unflatten)
from ait_jax.checkpoint.swin_v2 import swin_v2_entries, swin_v2_from_reference_kwargs
from ait_jax.models import swin_v2_tables as tables
from ait_jax.models.swin_v2 import SwinV2, SwinV2Block

# Three stages with odd maps after the patch embedding, a shift in every stage and a
# window larger than the last map.
TINY = dict(embed_dim=8, depths=(2, 2, 2), num_heads=(2, 2, 4), window_sizes=(4, 3, 8),
            pretrain_window_sizes=(3, 4, 2), shifts=(True, True, True),
            out_indices=(0, 1, 2), drop_path_rate=0.5, rpe_hidden_dim=16)
IMAGE_HW = (98, 75)  # 25 x 19 patches (padded), then 13 x 10, then 7 x 5


def _images(seed=0, hw=IMAGE_HW, batch=2):
  return np.random.default_rng(seed).standard_normal((batch, *hw, 3), np.float32)


def _random_variables(module, *args, seed=0):
  """Variables of `module` drawn like the fixtures' weights, without compiling init."""
  abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args))
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in flatten(abstract).items():
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if path[-1] == "kernel":
      flat[path] = noise / np.sqrt(math.prod(leaf.shape[:-1]))
    elif path[-1] == "scale":
      flat[path] = 1 + 0.2 * noise
    elif path[-1] == "logit_scale":
      flat[path] = np.log(10) + 0.3 * noise
    else:
      flat[path] = 0.1 * noise
  return unflatten(flat)


def _apply(model, variables, images, train=False, rngs=None, **kwargs):
  """Jitted `model.apply` (op-by-op dispatch is slow on a 2-core machine)."""
  fn = jax.jit(lambda v, x, r: model.apply(v, x, train=train, rngs=r, **kwargs))
  return fn(variables, images, rngs)


@functools.cache
def _tiny_eval():
  """(variables, outputs, intermediates) of TINY in eval mode."""
  model, images = SwinV2(**TINY), _images()
  variables = _random_variables(model, images)
  outs, state = _apply(model, variables, images, mutable=["intermediates"])
  return variables, outs, state["intermediates"]


def test_output_shapes_for_odd_input_size():
  _, outs, _ = _tiny_eval()
  assert [o.shape for o in outs] == [(2, 25, 19, 8), (2, 13, 10, 16), (2, 7, 5, 32)]
  assert all(o.dtype == jnp.float32 and np.isfinite(np.asarray(o)).all() for o in outs)


def test_out_indices_select_stages():
  model = SwinV2(**{**TINY, "out_indices": (2,)})
  images = _images()
  variables = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images))
  assert set(variables["params"]) == {"patch_embed", "layers_0", "layers_1", "layers_2",
                                      "norm2"}
  outs = jax.eval_shape(model.apply, variables, images)
  assert [o.shape for o in outs] == [(2, 7, 5, 32)]



def test_mapping_round_trip_and_coverage_of_a_random_model():
  model = SwinV2(**TINY)
  images = _images()
  entries = swin_v2_entries(model)
  check_covers(entries, nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images)))
  variables = _random_variables(model, images)
  state_dict = to_torch(variables, entries)
  again = to_flax(state_dict, entries)
  assert jax.tree.all(jax.tree.map(np.array_equal, again, variables))
  back = to_torch(again, entries)
  assert all(np.array_equal(back[k], v) for k, v in state_dict.items())
  buffers = [e for e in entries if isinstance(e, Buffer)]
  assert len(buffers) == 2 * sum(TINY["depths"])


def test_wrong_state_dict_lists_every_problem():
  model = SwinV2(**TINY)
  entries = swin_v2_entries(model)
  state_dict = to_torch(_random_variables(model, _images()), entries)
  del state_dict["layers.1.blocks.0.attn.q_bias"]
  state_dict["layers.1.blocks.0.attn.k_bias"] = np.zeros(16, np.float32)
  state_dict["layers.1.downsample.reduction.weight"] = np.zeros((32, 32), np.float32)
  index = "layers.0.blocks.1.attn.relative_position_index"
  state_dict[index] = state_dict[index] + 1
  with pytest.raises(StateDictMismatch) as err:
    to_flax(state_dict, entries)
  e = err.value
  assert e.missing == ["layers.1.blocks.0.attn.q_bias"]
  assert e.unexpected == ["layers.1.blocks.0.attn.k_bias"]
  assert [s[0] for s in e.shape] == ["layers.1.downsample.reduction.weight"]
  assert [v[0] for v in e.value] == [index]
  for key in ("q_bias", "k_bias", "reduction.weight", "relative_position_index"):
    assert key in str(e)


def test_reference_kwargs_reject_unimplemented_options():
  for bad in (dict(attn_type="normal"), dict(postnorm=False), dict(ape=True),
              dict(use_checkpoint=[True, False, False, False])):
    with pytest.raises(ValueError, match=next(iter(bad))):
      swin_v2_from_reference_kwargs(bad)
  with pytest.raises(ValueError, match="no_such_option"):
    swin_v2_from_reference_kwargs(dict(no_such_option=1))
  with pytest.raises(ValueError, match="SwinTransformer"):
    swin_v2_from_reference_kwargs(dict(type="SwinTransformer"))


def test_drop_path_is_identity_in_eval_and_seeded_in_train():
  model, images = SwinV2(**TINY), _images()
  variables, eval_out, eval_inter = _tiny_eval()

  run = jax.jit(lambda seed: model.apply(variables, images, train=True,
                                         mutable=["intermediates"],
                                         rngs={"dropout": jax.random.key(seed)}))
  train = lambda seed: run(jnp.uint32(seed))  # noqa: E731  one compilation for all

  (out_a, state_a), (out_b, _), (out_c, _) = train(3), train(3), train(4)
  assert all(np.array_equal(a, b) for a, b in zip(out_a, out_b))
  assert not np.allclose(out_a[-1], out_c[-1])
  assert not np.allclose(out_a[-1], eval_out[-1])
  # The linear schedule starts at rate 0: the very first block never drops (equal up
  # to the rounding of another compilation).
  first = lambda inter: inter["layers_0"]["blocks_0"]["out"][0]  # noqa: E731
  np.testing.assert_allclose(first(state_a["intermediates"]), first(eval_inter),
                             rtol=1e-5, atol=1e-5)


def test_drop_path_drops_whole_samples_and_is_identity_in_eval():
  block = SwinV2Block(num_heads=2, window=4, pretrain_window=3, shift=2, drop_path=0.5,
                      rpe_hidden_dim=16)
  x = np.random.default_rng(0).standard_normal((16, 8, 8, 8), np.float32)
  variables = _random_variables(block, x)
  run = jax.jit(lambda x, det, seed: block.apply(
      variables, x, det, rngs={"dropout": jax.random.key(seed)}), static_argnums=1)
  no_drop = jax.jit(block.clone(drop_path=0.0).apply)(variables, x)
  np.testing.assert_allclose(run(x, True, 0), no_drop, rtol=1e-5, atol=1e-5)
  out = np.asarray(run(x, False, 5))
  # A sample whose two residual branches are both dropped passes through unchanged.
  unchanged = np.all(out == x, axis=(1, 2, 3))
  assert 0 < unchanged.sum() < 16


def test_remat_gives_identical_outputs_and_gradients():
  config = dict(embed_dim=8, depths=(2,), num_heads=(2,), window_sizes=(4,),
                pretrain_window_sizes=(3,), shifts=(True,), out_indices=(0,),
                drop_path_rate=0.5, rpe_hidden_dim=16)
  images = _images(hw=(20, 18))
  plain, remat = SwinV2(**config), SwinV2(**config, remat=True)
  variables = _random_variables(plain, images)
  assert (jax.tree.structure(variables) == jax.tree.structure(
      nn.unbox(jax.eval_shape(remat.init, jax.random.key(0), images))))

  def loss(model, params):
    outs, state = model.apply(params, images, train=True, mutable=["intermediates"],
                              rngs={"dropout": jax.random.key(7)})
    return sum(jnp.sum(o**2) for o in outs), state

  (l1, s1), g1 = jax.jit(jax.value_and_grad(lambda p: loss(plain, p), has_aux=True))(
      variables)
  (l2, s2), g2 = jax.jit(jax.value_and_grad(lambda p: loss(remat, p), has_aux=True))(
      variables)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  # Padded tokens have zero keys; their norm must not turn the gradient into NaN.
  assert all(np.isfinite(a).all() for a in jax.tree.leaves(g1))
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(a).max()))
  # The debug values are sown through the remat boundary too.
  assert jax.tree.structure(s1) == jax.tree.structure(s2)


def test_bfloat16_compute_keeps_float32_outputs():
  variables, ref, _ = _tiny_eval()
  outs = _apply(SwinV2(**TINY, dtype=jnp.bfloat16), variables, _images())
  for got, want in zip(outs, ref):
    assert got.dtype == jnp.float32
    # Loose: bf16 rounding passes through six cosine-attention blocks.
    assert float(jnp.mean(jnp.abs(got - want))) < 0.1


def test_tables_match_their_definitions():
  window = 3
  index = tables.relative_position_index(window)
  pos = [(h, w) for h in range(window) for w in range(window)]
  for i, (hi, wi) in enumerate(pos):
    for j, (hj, wj) in enumerate(pos):
      assert index[i, j] == (hi - hj + 2) * 5 + (wi - wj + 2)
  np.testing.assert_array_equal(np.asarray(tables.relative_position_index(5, xp=jnp)),
                                tables.relative_position_index(5))
  table = tables.relative_coords_table(window, pretrain_window=5)
  t = np.arange(-2, 3) / 4 * 8
  np.testing.assert_allclose(table[0, :, 0, 0], np.sign(t) * np.log2(1 + np.abs(t)) / 3,
                             rtol=1e-6)
  # Padded 6x6 map, window 4 -> padded to 8x8; regions split at 8-4 and 8-2.
  ids = tables.shift_region_ids((8, 8), 4, 2)
  assert ids.shape == (4, 16)
  assert set(ids[0]) == {0} and set(ids[3]) == {4, 5, 7, 8}
