"""ARTransformer: cached decoding against teacher forcing, compiled-loop structure,
AiT-P, sampling, and the reference weight mapping."""

import collections
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ait_jax.checkpoint import mapping
from ait_jax.checkpoint.transformer import (transformer_entries,
                                            transformer_from_reference_kwargs)
from ait_jax.models import axes, decoding
from ait_jax.models.transformer import (DEPTH_TASK, DET_TASK, INSSEG_TASK, ARTransformer,
                                        sine_position_table)
from ait_jax.models.vocab import Vocab

jax.config.update("jax_default_matmul_precision", "highest")

VOCAB = Vocab(num_bins=10, num_classes=3, num_mask_codes=6, num_depth_codes=8, size=36)
B, H, W, C = 2, 3, 5, 12  # memory of 15 tokens: no other dimension is 15
ATOL = 2e-5
PRED_LEN = 9  # one length for most tests: their compilations are shared


def _model(**overrides) -> ARTransformer:
  kwargs = dict(vocab=VOCAB, in_chans=C, d_model=32, num_heads=4, num_encoder_layers=2,
                num_decoder_layers=2, mlp_dim=48, drop_path_rate=0.0, dropout_rate=0.0,
                dec_length=40, n_rows=4, n_cols=6, top_p=0.0)
  return ARTransformer(**{**kwargs, **overrides})


def _init(model: ARTransformer, seed: int = 0, scale: float = 1.0):
  """Random variables straight from the mapping (no compilation): kernels of unit
  output scale, LayerNorms near identity, embeddings of std `scale` (large: logits far
  apart; small: flat distributions)."""
  rng = np.random.default_rng(seed)
  flat = {}
  for e in transformer_entries(model):
    if not isinstance(e, mapping.Param):
      continue
    noise = rng.standard_normal(e.flax_shape).astype(np.float32)
    kind = e.flax_path[-1]
    if kind == "kernel":
      value = noise / np.sqrt(e.flax_shape[0])
    elif kind == "scale":
      value = 1 + 0.2 * noise
    elif kind == "bias" and len(e.flax_path) > 2:
      value = 0.1 * noise
    else:
      value = scale * noise
    flat[e.flax_path] = jnp.asarray(value)
  return mapping.unflatten(flat)


def _src(seed: int = 7):
  return jax.random.normal(jax.random.key(seed), (B, H, W, C))


# Jitted (once per model and static argument) rather than compiled op by op.

@functools.cache
def _jitted(model: ARTransformer, method=None, **static):
  return jax.jit(lambda v, *args, **kwargs: model.apply(v, *args, method=method,
                                                       **static, **kwargs))


def _forward(model, variables, input_seq, task_id, train=False, seed=0):
  fn = _jitted(model, train=train)
  return fn(variables, _src(), input_seq, jnp.broadcast_to(task_id, (B,)),
            rngs={"dropout": jax.random.key(seed)})


def _teacher_forced(model, variables, absolute_tokens, task_id):
  return _forward(model, variables, absolute_tokens[:, :-1], task_id)


def _decode_depth(model, variables, pred_len, key=None):
  fn = _jitted(model, decoding.decode_depth, pred_len=pred_len)
  return fn(variables, _src(), key=key)


def _decode_objects(model, variables, task_id, num_objects, mask_token_length=0,
                    key=None):
  fn = _jitted(model, decoding.decode_objects, task_id=task_id, num_objects=num_objects,
               mask_token_length=mask_token_length)
  return fn(variables, _src(), key=key)


def _walk(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _walk(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _walk(sub)


def _primitives(jaxpr) -> collections.Counter:
  return collections.Counter(e.primitive.name for e in _walk(jaxpr))


# Cached decoding reproduces teacher forcing.

def test_hard_feedback_decode_equals_teacher_forcing():
  model = _model()
  variables = _init(model)
  pred = _decode_depth(model, variables, PRED_LEN)
  np.testing.assert_array_equal(pred.tokens, jnp.argmax(pred.logits, -1))
  logits = _teacher_forced(model, variables, pred.tokens + VOCAB.depth_offset,
                           DEPTH_TASK)
  np.testing.assert_allclose(pred.logits, logits[..., VOCAB.depth_codes], atol=ATOL)


@pytest.mark.parametrize("mask_before_label", [False, True])
def test_object_decode_equals_teacher_forcing(mask_before_label):
  model = _model(mask_before_label=mask_before_label)
  variables = _init(model)
  t, n = 4, 2
  pred = _decode_objects(model, variables, INSSEG_TASK, n, t)
  start, stop, is_label, is_mask = decoding.object_layout(model, n, t)
  assert is_label[8 if mask_before_label else 4] and is_mask.sum() == n * t
  logits = _teacher_forced(model, variables, pred.tokens + start, INSSEG_TASK)
  for i in range(start.size):
    np.testing.assert_array_equal(
        pred.tokens[:, i], jnp.argmax(logits[:, i, start[i]:stop[i]], -1))
  np.testing.assert_allclose(
      pred.mask_logits.reshape(B, n * t, -1), logits[:, is_mask][..., VOCAB.mask_codes],
      atol=ATOL)
  label_logits = logits[:, is_label]
  with_noise = jnp.concatenate([label_logits[..., VOCAB.classes],
                                label_logits[..., VOCAB.noise_label, None]], -1)
  probs = jax.nn.softmax(with_noise, -1)
  classes = pred.tokens[:, is_label]
  np.testing.assert_allclose(
      pred.scores, jnp.take_along_axis(probs, classes[..., None], -1)[..., 0], atol=1e-6)


def test_det_decode_ranges():
  model = _model(top_p=0.9)
  pred = _decode_objects(model, _init(model, scale=0.05), DET_TASK, 3,
                         key=jax.random.key(3))
  tokens = np.asarray(pred.tokens).reshape(B, 3, 5)
  assert (tokens[..., :4] >= 0).all() and (tokens[..., :4] <= VOCAB.num_bins).all()
  assert (tokens[..., 4] >= 0).all() and (tokens[..., 4] < VOCAB.num_classes).all()
  assert pred.scores.shape == (B, 3) and pred.mask_logits.shape == (B, 3, 0, 6)


def test_soft_feedback_changes_later_steps_only():
  hard, soft = _model(), _model(soft_transformer=True)
  variables = _init(hard)
  a = _decode_depth(hard, variables, PRED_LEN)
  b = _decode_depth(soft, variables, PRED_LEN)
  np.testing.assert_allclose(a.logits[:, 0], b.logits[:, 0], atol=1e-6)
  assert np.abs(np.asarray(a.logits[:, 1:] - b.logits[:, 1:])).max() > 1e-3


def test_soft_mask_feedback_starts_after_the_first_mask_code():
  hard, soft = _model(), _model(soft_transformer=True)
  variables = _init(hard)
  a = _decode_objects(hard, variables, INSSEG_TASK, 2, 4)
  b = _decode_objects(soft, variables, INSSEG_TASK, 2, 4)
  np.testing.assert_array_equal(a.tokens[:, :6], b.tokens[:, :6])  # box, class, code
  np.testing.assert_allclose(a.mask_logits[:, 0, 0], b.mask_logits[:, 0, 0], atol=1e-6)
  assert np.abs(np.asarray(a.mask_logits[:, 0, 1] - b.mask_logits[:, 0, 1])).max() > 1e-3


# The compiled loop.

def _decode_jaxpr(model, variables, pred_len):
  return jax.make_jaxpr(lambda v, s: model.apply(v, s, pred_len=pred_len,
                                                 method=decoding.decode_depth))(
                                                     variables, _src()).jaxpr


@pytest.mark.parametrize("soft", [False, True])
def test_decode_traces_the_decoder_once(soft):
  model = _model(soft_transformer=soft)
  variables = _init(model)
  short, long = _decode_jaxpr(model, variables, 3), _decode_jaxpr(model, variables, 11)
  counts = _primitives(short)
  assert counts["scan"] == 1 and counts["while"] == 0
  assert counts == _primitives(long)  # nothing unrolled over the positions
  (loop,) = [e for e in short.eqns if e.primitive.name == "scan"]
  body = loop.params["jaxpr"].jaxpr
  memory_projections = [e for e in _walk(body) if e.primitive.name == "dot_general"
                        and e.outvars[0].aval.shape == (B, H * W, model.d_model)]
  assert not memory_projections  # cross-attention keys/values come from the cache
  # Per step: 2 layers x (self q/k/v/proj + 2 attention products + cross q/proj +
  # 2 attention products + 2 MLP) + the logits (+ the soft token).
  body_dots = sum(e.primitive.name == "dot_general" for e in _walk(body))
  assert body_dots == 2 * 12 + 1 + soft


def test_parallel_is_one_decoder_pass():
  model = _model(parallel=True)
  variables = _init(model)
  pred = _decode_depth(model, variables, 7)
  logits = _teacher_forced(model, variables, jnp.zeros((B, 7), jnp.int32), DEPTH_TASK)
  np.testing.assert_allclose(pred.logits, logits[..., VOCAB.depth_codes], atol=1e-6)
  decode = _primitives(_decode_jaxpr(model, variables, 7))
  forward = _primitives(jax.make_jaxpr(
      lambda v, s: model.apply(v, s, jnp.zeros((B, 6), jnp.int32), DEPTH_TASK))(
          variables, _src()).jaxpr)
  assert decode["scan"] == decode["while"] == 0
  assert decode["dot_general"] == forward["dot_general"]


# Sampling.

def test_nucleus_sample_keeps_the_nucleus():
  logits = jnp.log(jnp.array([0.2, 0.5, 0.3]))
  draws = jax.jit(jax.vmap(lambda k: decoding.nucleus_sample(k, logits, 0.6)))(
      jax.random.split(jax.random.key(0), 400))
  assert set(np.unique(draws).tolist()) == {1, 2}  # 0.5 <= 0.6 < 0.8: two kept
  many = jax.random.normal(jax.random.key(1), (5, 7, 30))
  tiny = jax.jit(lambda k, x: decoding.nucleus_sample(k, x, 1e-6))
  np.testing.assert_array_equal(tiny(jax.random.key(2), many), np.argmax(many, -1))
  with pytest.raises(ValueError, match="PRNG key"):
    decoding.nucleus_sample(None, many, 0.5)


def test_sampled_decoding():
  variables = _init(_model(), scale=0.05)  # flat distributions
  greedy = _decode_depth(_model(), variables, PRED_LEN)
  tiny = _decode_depth(_model(top_p=1e-6), variables, PRED_LEN, jax.random.key(0))
  np.testing.assert_array_equal(tiny.tokens, greedy.tokens)
  np.testing.assert_allclose(tiny.logits, greedy.logits, atol=1e-6)
  sampler = _model(top_p=0.95)

  def draw(seed):
    return _decode_depth(sampler, variables, PRED_LEN, jax.random.key(seed)).tokens
  np.testing.assert_array_equal(draw(5), draw(5))
  assert not np.array_equal(draw(5), draw(6))


# Training mode.

def test_dropout_only_in_training():
  model = _model(drop_path_rate=0.2, dropout_rate=0.2)
  variables = _init(model)
  seq, task = jnp.ones((B, PRED_LEN - 1), jnp.int32), jnp.array([DEPTH_TASK, DET_TASK])

  def run(train, seed=0):
    return _forward(model, variables, seq, task, train, seed)
  np.testing.assert_array_equal(run(False, 0), run(False, 1))
  np.testing.assert_array_equal(run(True, 0), run(True, 0))
  assert not np.allclose(run(True, 0), run(True, 1))


def test_bfloat16_compute_keeps_float32_logits():
  variables = _init(_model())
  seq, task = jnp.ones((B, PRED_LEN - 1), jnp.int32), jnp.full((B,), DEPTH_TASK)
  full = _forward(_model(), variables, seq, task)
  half = _forward(_model(dtype=jnp.bfloat16), variables, seq, task)
  assert half.dtype == jnp.float32
  assert np.abs(np.asarray(half - full)).max() < 0.03 * np.abs(np.asarray(full)).max()


# Weight mapping.

@pytest.mark.parametrize("options", [{}, {"parallel": True, "pos_enc": "learned"}])
def test_every_param_has_logical_axis_names(options):
  model = _model(**options)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), _src(),
                                            jnp.zeros((B, 3), jnp.int32),
                                            jnp.zeros((B,), jnp.int32)))
  leaves = jax.tree.leaves(boxed,
                           is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  params = [e for e in transformer_entries(model) if isinstance(e, mapping.Param)]
  assert len(leaves) == len(params)
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned)
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= axes.ALL


def test_sine_table_layout():
  d, half = 16, 8
  table = sine_position_table(3, 5, d)
  r, c = np.meshgrid(np.arange(3), np.arange(5), indexing="ij")
  for ch, fn in ((0, np.sin), (1, np.cos), (2, np.sin), (7, np.cos)):
    freq = 10000.0 ** (2 * (ch // 2) / half)
    np.testing.assert_allclose(table[..., ch], fn(r / freq), atol=1e-6)
    np.testing.assert_allclose(table[..., half + ch], fn(c / freq), atol=1e-6)


@pytest.mark.parametrize("options", [{}, {"parallel": True, "pos_enc": "learned"},
                                     {"pos_enc": "sine_norm"}])
def test_mapping_round_trip(options):
  model = _model(**options)
  variables = _init(model)
  entries = transformer_entries(model)
  mapping.check_covers(entries, variables)
  state_dict = mapping.to_torch(variables, entries)
  assert list(state_dict) == [e.torch_key for e in entries]
  keys = list(state_dict)
  if options.get("parallel"):
    assert keys[:3] == ["enc_embed", "mask_embed", "det_embed"]
  else:
    assert keys[:6] == ["det_embed", "voc_embed", "dec_embed", "outp_bias", "enc_embed",
                        "input_proj.weight"]
  back = mapping.to_flax(state_dict, entries)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, variables))


def test_wrong_state_dict_lists_every_problem():
  model = _model()
  state_dict = mapping.to_torch(_init(model), transformer_entries(model))
  del state_dict["voc_embed"]
  state_dict["decoder.blocks.0.attn.wq.weight"] = np.zeros((32, 31), np.float32)
  state_dict["enc_embed"] = state_dict["enc_embed"] + 0.1
  state_dict["classifier.weight"] = np.zeros((3,), np.float32)
  with pytest.raises(mapping.StateDictMismatch) as err:
    mapping.to_flax(state_dict, transformer_entries(model))
  message = str(err.value)
  for key in ("voc_embed", "decoder.blocks.0.attn.wq.weight", "enc_embed",
              "classifier.weight"):
    assert key in message


def test_from_reference_kwargs():
  model = transformer_from_reference_kwargs(
      {"type": "ARTransformer", "in_chans": 64, "num_vocal": 2339, "num_bins": 2000,
       "soft_vae": True, "head_args": {"depth": {}}})
  assert (model.d_model, model.num_heads, model.top_p, model.pos_enc) == (
      512, 8, 0.4, "sine")
  assert model.vocab.depth_offset == 2211
  with pytest.raises(ValueError) as err:
    transformer_from_reference_kwargs({"in_chans": 8, "pred_eos": True, "qk_pos": True})
  assert "pred_eos" in str(err.value) and "qk_pos" in str(err.value)
  with pytest.raises(ValueError, match="unknown ARTransformer options: bogus"):
    transformer_from_reference_kwargs({"in_chans": 8, "bogus": 1})


def test_vocab_offsets():
  v = Vocab(num_bins=2000, num_classes=80, num_mask_codes=128, num_depth_codes=128,
            size=2467)
  assert v.offsets() == {"class_offset": 2001, "special_offset": 2081,
                         "noise_label": 2082, "mask_offset": 2083, "depth_offset": 2211,
                         "enddepth_offset": 2339, "num_vocal": 2467}
  assert (v.bins, v.classes, v.mask_codes, v.depth_codes) == (
      slice(0, 2001), slice(2001, 2081), slice(2083, 2211), slice(2211, 2339))
  with pytest.raises(ValueError, match="smaller"):
    Vocab(num_bins=2000, num_classes=80, num_mask_codes=128, num_depth_codes=128,
          size=2338)
