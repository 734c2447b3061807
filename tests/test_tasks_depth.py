"""The depth task against closed forms: targets, loss, test-time windows, outputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ait_jax.checkpoint.ait import ait_from_reference_config
from ait_jax.models.ait import AiT
from ait_jax.models.transformer import DEPTH_TASK
from ait_jax.models.vqvae import VQVAE
from ait_jax.tasks import depth as depth_task
from ait_jax.tasks.depth_outputs import write_depth_prediction

jax.config.update("jax_default_matmul_precision", "highest")

MASK = 32  # tokenizer map side = window height
TINY = dict(
    type="AiT",
    backbone=dict(type="SwinV2TransformerRPE2FC", embed_dim=8, depths=[1, 1],
                  num_heads=[1, 2], window_size=[4, 4], pretrain_window_size=[4, 4],
                  use_shift=[True, False], drop_path_rate=0.0, out_indices=(1,)),
    transformer=dict(type="ARTransformer", in_chans=16, d_model=16, nhead=2,
                     num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
                     drop_path=0.0, drop_out=0.0, num_vocal=24, num_bins=4, num_classes=2,
                     num_embeddings=2, num_embeddings_depth=8, dec_length=8, n_rows=6,
                     n_cols=6, soft_vae=True, soft_transformer=True, top_p=0.0),
    task_heads=dict(depth=dict(
        type="DepthHead", task_id=2, vae_cfg=dict(
            type="VQVAE", token_length=4, mask_size=MASK, embedding_dim=4, hidden_dim=8,
            num_resnet_blocks=1, num_embeddings=8, use_norm=False, tau=0.8))),
)


def _random_variables(init, *args, seed: int):
  """Variables of `init`'s shapes filled from numpy (compiling the random init of even
  a tiny model takes many seconds on CPU)."""
  shapes = nn.meta.unbox(jax.eval_shape(init, jax.random.key(0), *args))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = path[-1].key
    n = rng.standard_normal(x.shape).astype(np.float32)
    if name == "kernel":
      return n / np.sqrt(np.prod(x.shape[:-1]))
    if name == "scale":
      return 1 + 0.1 * n
    if name == "logit_scale":
      return np.log(10) + 0.1 * n
    return (0.1 if name.endswith("bias") else 0.5) * n

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def tiny():
  ref = ait_from_reference_config(TINY)
  tokenizer = ref.tokenizers["depth"]
  model_vars = _random_variables(
      ref.model.init, jnp.zeros((1, MASK, MASK, 3)), jnp.zeros((1, 3), jnp.int32),
      jnp.full((1,), DEPTH_TASK), seed=0)
  tok_vars = _random_variables(tokenizer.init, jnp.zeros((1, MASK, MASK)), seed=1)
  # Decoded depths mostly positive, as the fixtures' tokenizer makes them.
  tok_vars["params"]["decoder"]["to_pixels"]["bias"] = np.full((1,), 3.0, np.float32)
  # A codebook at the scale of the encoder's features gives varied codes.
  maps = jax.random.uniform(jax.random.key(2), (4, MASK, MASK), minval=0.5, maxval=5.0)
  feats = jax.jit(lambda v, x: tokenizer.apply(v, x, method=lambda m, y: m._features(y)))(
      tok_vars, maps)
  codebook = feats.reshape(-1, feats.shape[-1])[:tokenizer.num_embeddings]
  tok_vars["vq"]["quantizer"]["embedding"] = codebook
  return ref, model_vars, tokenizer, tok_vars


def _depth_maps(key, shape):
  depth = jax.random.uniform(key, shape, minval=0.5, maxval=5.0)
  return jnp.where(jax.random.uniform(jax.random.fold_in(key, 1), shape) < 0.05, 0.0, depth)


# --- silog, soft decoding, targets, loss -------------------------------------------

def test_silog_closed_forms():
  target = jax.random.uniform(jax.random.key(0), (2, 8, 8), minval=0.5, maxval=8.0)
  target = target.at[0, 0, :3].set(0.0)  # invalid pixels
  scale = 1.7
  pred = (target * scale).at[0, 0, :3].set(123.0)  # values at invalid pixels are ignored
  np.testing.assert_allclose(depth_task.silog_loss(pred, target),
                             np.log(scale) / np.sqrt(2), rtol=1e-5)
  # With lambd 1 the loss is the standard deviation of the log error: +-log(scale).
  valid_target = target.at[0, 0, :3].set(1.0)
  signs = jnp.where(jnp.arange(64).reshape(8, 8) % 2 == 0, 1.0, -1.0)
  pred = valid_target * scale ** signs
  np.testing.assert_allclose(depth_task.silog_loss(pred, valid_target, lambd=1.0),
                             np.log(scale), rtol=1e-5)
  # The head clips predictions to 1e-3; the metrics' variant does not.
  tiny_pred = jnp.full_like(target, 1e-6)
  np.testing.assert_allclose(
      depth_task.silog_loss(tiny_pred, target),
      depth_task.silog_loss(jnp.full_like(target, 1e-3), target), rtol=1e-6)
  assert depth_task.silog_loss(tiny_pred, target, min_pred=None) > \
      depth_task.silog_loss(tiny_pred, target)


def test_soft_decode_of_one_dominant_code_is_hard_decode(tiny):
  _, _, tokenizer, tok_vars = tiny
  tokens = jax.random.randint(jax.random.key(3), (2, 4), 0, tokenizer.num_embeddings)
  logits = 1e3 * jax.nn.one_hot(tokens, tokenizer.num_embeddings)
  soft = tokenizer.apply(tok_vars, logits, method=VQVAE.decode_soft)
  hard = tokenizer.apply(tok_vars, tokens, method=VQVAE.decode)
  np.testing.assert_allclose(soft, hard, atol=1e-6)


def test_targets_are_tokenizer_codes_plus_offset(tiny):
  ref, _, tokenizer, tok_vars = tiny
  vocab = ref.model.transformer.vocab
  depth = _depth_maps(jax.random.key(4), (3, MASK, MASK))
  targets = jax.jit(depth_task.depth_targets, static_argnums=(0, 3))(
      tokenizer, tok_vars, depth, vocab)
  codes = tokenizer.apply(tok_vars, depth, method=VQVAE.encode)
  assert targets.dtype == jnp.int32 and targets.shape == (3, tokenizer.token_length)
  np.testing.assert_array_equal(targets, codes + vocab.depth_offset)
  assert np.all((targets >= vocab.depth_codes.start) & (targets < vocab.depth_codes.stop))
  assert len(np.unique(targets)) > 1


def _loss(tiny, logits, targets, depth, **weights):
  ref, _, tokenizer, tok_vars = tiny
  fn = jax.jit(lambda lg, t, d: depth_task.depth_loss(
      lg, t, d, tokenizer, tok_vars, ref.model.transformer.vocab, **weights))
  return fn(logits, targets, depth)


def test_loss_of_uniform_logits(tiny):
  ref, _, tokenizer, tok_vars = tiny
  vocab = ref.model.transformer.vocab
  depth = _depth_maps(jax.random.key(5), (2, MASK, MASK))
  targets = depth_task.depth_targets(tokenizer, tok_vars, depth, vocab)
  logits = jnp.zeros((2, 4, vocab.size))
  loss, metrics = _loss(tiny, logits, targets, depth, loss_weight=0.7,
                        decoder_loss_weight=0.0)
  np.testing.assert_allclose(metrics["depth_ce"], np.log(vocab.size), rtol=1e-6)
  assert metrics["depth_decoder_aux_ce"] == 0.0
  np.testing.assert_allclose(loss, 0.7 * np.log(vocab.size), rtol=1e-6)

  # Uniform code weights: the soft decode reads the mean codebook row everywhere.
  loss, metrics = _loss(tiny, logits, targets, depth, loss_weight=0.7,
                        decoder_loss_weight=2.0)
  mean_code = jnp.mean(tok_vars["vq"]["quantizer"]["embedding"], axis=0)
  decoded = tokenizer.apply(tok_vars, jnp.broadcast_to(mean_code, (2, 2, 2, 4)),
                            method=lambda m, c: m._decode_codes(c))
  aux = depth_task.silog_loss(decoded, depth)
  np.testing.assert_allclose(metrics["depth_decoder_aux_ce"], aux, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.7 * (np.log(vocab.size) + 2.0 * aux), rtol=1e-5)


def test_loss_ignores_padding_and_extra_positions(tiny):
  ref, _, tokenizer, tok_vars = tiny
  vocab = ref.model.transformer.vocab
  depth = _depth_maps(jax.random.key(6), (2, MASK, MASK))
  targets = depth_task.depth_targets(tokenizer, tok_vars, depth, vocab)
  targets = targets.at[1, 2:].set(-100)
  logits = jax.random.normal(jax.random.key(7), (2, 6, vocab.size)) * 2
  loss, metrics = _loss(tiny, logits, targets, depth, loss_weight=1.5,
                        decoder_loss_weight=0.5)
  logp = np.asarray(jax.nn.log_softmax(logits[:, :4]), np.float64)
  t = np.asarray(targets)
  nll = [-logp[b, i, t[b, i]] for b in range(2) for i in range(4) if t[b, i] >= 0]
  np.testing.assert_allclose(metrics["depth_ce"], np.mean(nll), rtol=1e-5)
  soft = tokenizer.apply(tok_vars, logits[:, :4, vocab.depth_codes],
                         method=VQVAE.decode_soft)
  aux = depth_task.silog_loss(soft, depth)
  np.testing.assert_allclose(metrics["depth_decoder_aux_ce"], aux, rtol=1e-5)
  np.testing.assert_allclose(loss, 1.5 * (np.mean(nll) + 0.5 * aux), rtol=1e-5)

  grads = jax.grad(lambda lg: _loss(tiny, lg, targets, depth, loss_weight=1.5,
                                    decoder_loss_weight=0.5)[0])(logits)
  assert np.all(grads[:, 4:] == 0)  # positions past the targets
  assert np.all(np.isfinite(grads)) and np.any(grads[0, :, vocab.depth_codes] != 0)


def test_loss_rejects_non_token_grid_targets(tiny):
  ref, _, tokenizer, tok_vars = tiny
  with pytest.raises(ValueError, match="tokens"):
    depth_task.depth_loss(jnp.zeros((1, 5, 24)), jnp.zeros((1, 5), jnp.int32),
                          jnp.ones((1, MASK, MASK)), tokenizer, tok_vars,
                          ref.model.transformer.vocab, loss_weight=1.0,
                          decoder_loss_weight=1.0)


# --- test-time windows -----------------------------------------------------------

def test_window_starts():
  starts = depth_task.window_starts
  assert starts(128, 192, shift_window_test=True, shift_size=2) == (0, 64)
  assert starts(480, 640, shift_window_test=True, shift_size=3) == (0, 80, 160)
  assert starts(32, 32, shift_window_test=True, shift_size=4) == (0,)
  assert starts(32, 32, shift_window_test=False, shift_size=2) == (0,)
  for h, w, on, n, match in ((32, 48, False, 2, "shift_window_test"),
                             (48, 32, True, 2, "taller"),
                             (32, 48, True, 1, "at least 2"),
                             (32, 49, True, 3, "uncovered")):
    with pytest.raises(ValueError, match=match):
      starts(h, w, shift_window_test=on, shift_size=n)


def test_window_images_order():
  images = jnp.arange(2 * 4 * 6, dtype=jnp.float32).reshape(2, 4, 6, 1)
  windows = depth_task.window_images(images, (0, 2), flip_test=True)
  assert windows.shape == (8, 4, 4, 1)
  want = [images[0, :, 0:4], images[1, :, 0:4], images[0, :, 2:6], images[1, :, 2:6]]
  want += [w[:, ::-1] for w in want]
  np.testing.assert_array_equal(windows, jnp.stack(want))


def test_merge_averages_flips_and_overlaps():
  h, width, starts = 4, 7, (0, 3)
  plain = jnp.array([1.0, 2.0, 3.0, 4.0])          # windows (0, img0), (0, img1), ...
  flipped = jnp.array([3.0, 6.0, 5.0, 0.0])
  depths = jnp.concatenate([plain, flipped])[:, None, None] * jnp.ones((8, h, h))
  merged = depth_task.merge_window_depths(depths, starts, width, flip_test=True)
  per_window = (plain + flipped) / 2                # [2, 4, 4, 2]
  for b in range(2):
    first, second = per_window[b], per_window[2 + b]
    want = [first] * 3 + [(first + second) / 2] + [second] * 3
    np.testing.assert_allclose(merged[b], jnp.broadcast_to(jnp.array(want), (h, width)))

  # A mirrored window's map is flipped back before averaging; results are clipped.
  ramp = jnp.broadcast_to(jnp.arange(h, dtype=jnp.float32) - 1, (h, h))
  depths = jnp.stack([ramp, ramp[:, ::-1]])
  merged = depth_task.merge_window_depths(depths, (0,), h, flip_test=True)
  np.testing.assert_allclose(merged[0], jnp.maximum(ramp, depth_task.MIN_DEPTH))


def _predict(tiny, model_vars, images, **kw):
  ref, _, tokenizer, tok_vars = tiny
  fn = jax.jit(lambda mv, tv, x: depth_task.predict_depth(
      ref.model, mv, tokenizer, tv, x, token_length=tokenizer.token_length, **kw))
  return fn(model_vars, tok_vars, images)


def test_predict_with_constant_logits(tiny):
  """Every window decodes the same map D: the result is the mirror average
  S = (D + flip D) / 2 placed at each window, averaged where two overlap."""
  ref, model_vars, tokenizer, tok_vars = tiny
  vocab = ref.model.transformer.vocab
  params = model_vars["params"]["transformer"]
  bias = 3 * jax.random.normal(jax.random.key(8), params["outp_bias"].shape)
  const = {"params": {**model_vars["params"], "transformer": {
      **params, "voc_embed": jnp.zeros_like(params["voc_embed"]), "outp_bias": bias}}}
  images = jax.random.normal(jax.random.key(9), (2, MASK, MASK + 16, 3))
  pred = _predict(tiny, const, images, soft=True, shift_window_test=True, shift_size=2,
                  flip_test=True, padto=48)
  logits = jnp.broadcast_to(bias[vocab.depth_codes], (1, 4, vocab.num_depth_codes))
  d = tokenizer.apply(tok_vars, logits, method=VQVAE.decode_soft)[0]
  s = (d + d[:, ::-1]) / 2
  want = jnp.concatenate([s[:, :16], (s[:, 16:] + s[:, :16]) / 2, s[:, 16:]], axis=1)
  want = jnp.maximum(want, depth_task.MIN_DEPTH)
  assert pred.shape == (2, MASK, MASK + 16) and np.all(want > 0.1)
  np.testing.assert_allclose(pred, jnp.broadcast_to(want, pred.shape), atol=1e-5)


def test_predict_hard_is_decode_of_argmax(tiny):
  ref, model_vars, tokenizer, tok_vars = tiny
  images = jax.random.normal(jax.random.key(10), (2, MASK, MASK, 3))

  @jax.jit
  def predict_and_decode_argmax(mv, tv, x):
    pred = depth_task.predict_depth(
        ref.model, mv, tokenizer, tv, x, token_length=tokenizer.token_length, soft=False,
        shift_window_test=False, shift_size=2, flip_test=False)
    logits = ref.model.apply(mv, x, tokenizer.token_length, method=AiT.decode_depth).logits
    return pred, tokenizer.apply(tv, jnp.argmax(logits, axis=-1), method=VQVAE.decode)

  pred, decoded = predict_and_decode_argmax(model_vars, tok_vars, images)
  np.testing.assert_allclose(pred, jnp.maximum(decoded, depth_task.MIN_DEPTH), atol=1e-5)
  assert np.any(decoded > 0.1)


def test_predict_rejects_unsupported_shapes(tiny):
  _, model_vars, _, _ = tiny
  with pytest.raises(ValueError, match="high"):
    _predict(tiny, model_vars, jnp.zeros((1, 48, 64, 3)), soft=True,
             shift_window_test=True, shift_size=2, flip_test=True)


# --- resize / pad -----------------------------------------------------------------

def test_resize_and_pad_match_torch():
  x = jnp.array([[0.0, 1.0], [2.0, 3.0]])[None, :, :, None]
  up = depth_task.resize_and_pad(x, resizeto=4)[0, :, :, 0]
  # torch F.interpolate(bilinear, align_corners=False): half-pixel centres, clamped.
  cols = jnp.array([0.0, 0.25, 0.75, 1.0])
  rows = jnp.array([0.0, 0.5, 1.5, 2.0])
  np.testing.assert_allclose(up, rows[:, None] + cols[None, :], atol=1e-6)
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  down = depth_task.resize_and_pad(x, resizeto=2)[0, :, :, 0]  # no antialiasing
  np.testing.assert_allclose(down, [[2.5, 4.5], [10.5, 12.5]], atol=1e-6)
  padded = depth_task.resize_and_pad(jnp.ones((1, 2, 3, 1)), padto=4)
  np.testing.assert_array_equal(padded[0, :, :, 0], [[1, 1, 1, 0], [1, 1, 1, 0],
                                                     [0, 0, 0, 0], [0, 0, 0, 0]])
  with pytest.raises(ValueError, match="padto"):
    depth_task.resize_and_pad(jnp.ones((1, 5, 3, 1)), padto=4)


# --- writing predictions ----------------------------------------------------------

def test_write_depth_prediction_round_trip(tmp_path):
  depth = np.random.default_rng(0).uniform(0.2, 9.0, (6, 10)).astype(np.float32)
  depth[0, 0], depth[0, 1], depth[0, 2] = np.nan, 70.0, -1.0
  paths = write_depth_prediction(depth, tmp_path / "out", "img0")
  with Image.open(paths.millimetres_png) as im:
    mm = np.asarray(im)
  assert mm.dtype == np.uint16 and mm.shape == depth.shape
  want = np.rint(np.nan_to_num(depth.astype(np.float64), nan=0.0) * 1000)
  np.testing.assert_array_equal(mm, np.clip(want, 0, 65535))
  np.testing.assert_array_equal(np.load(paths.metres_npy), depth)
  with Image.open(paths.color_png) as im:
    rgb = np.asarray(im)
  assert rgb.shape == (6, 10, 3) and rgb.dtype == np.uint8
  assert tuple(rgb[0, 0]) == (0, 0, 0)  # not finite
  assert tuple(rgb[0, 1]) == (253, 231, 37) and tuple(rgb[0, 2]) == (68, 1, 84)  # far, near
