"""Unit tests of instance segmentation (ait_jax/tasks/insseg.py, masks.py).

Closed forms and invariants, with a stand-in tokenizer; the reference's numbers are in
tests/_draft_parity_heads.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ait_jax.models.vocab import Vocab
from ait_jax.tasks import detection
from ait_jax.tasks import insseg
from ait_jax.tasks import masks as masks_lib

VOCAB = Vocab(num_bins=16, num_classes=3, num_mask_codes=8, num_depth_codes=0, size=40)
TASK = insseg.InsSegTask(VOCAB, mask_size=8, mask_token_length=4, norm_val=64,
                         num_query=5, seq_aug=True, mask_weight=0.2,
                         decoder_loss_weight=5.0, dice_loss_weight=0.7)
HW = (40, 48)


def encode(crops):
  """Stand-in tokenizer: per 4x4 block of an 8x8 crop, its mean in 8 levels."""
  blocks = jnp.reshape(crops, (-1, 2, 4, 2, 4)).mean(axis=(2, 4))
  return jnp.minimum((blocks * 8).astype(jnp.int32), 7).reshape(-1, 4)


def decode_soft(logits):
  """Stand-in soft decoder: (M, 4, 8) logits -> (M, 8, 8) maps in [-0.25, 1.25]."""
  level = jax.nn.softmax(logits, axis=-1) @ jnp.linspace(-0.25, 1.25, 8)
  return jnp.repeat(jnp.repeat(level.reshape(-1, 2, 2), 4, axis=1), 4, axis=2)


def _objects(rng, n):
  """n elliptic instances with their boxes and labels on an HW image."""
  h, w = HW
  yy, xx = np.mgrid[:h, :w] + 0.5
  masks, boxes = [], []
  for _ in range(n):
    cx, cy = rng.uniform(8, w - 8), rng.uniform(8, h - 8)
    rx, ry = rng.uniform(3, 10, 2)
    m = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    masks.append(m.astype(np.uint8))
    ys, xs = np.nonzero(m)
    boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
  return (np.array(boxes, np.float32).reshape(-1, 4),
          rng.integers(0, VOCAB.num_classes, n),
          np.array(masks, np.uint8).reshape(n, h, w))


def _batch(rng, counts, task=TASK):
  objs = [_objects(rng, n) for n in counts]
  seqs = insseg.make_sequences(task, [o[0] for o in objs], [o[1] for o in objs],
                               [o[2] for o in objs], np.array([[*HW, 3]] * len(counts)),
                               rng=rng)
  return objs, seqs


# --- roi_align, crops ----------------------------------------------------------------

def test_roi_align_identity_and_block_average():
  rng = np.random.default_rng(0)
  maps = rng.random((2, 8, 8)).astype(np.float32)
  whole = np.array([[0, 0, 8, 8]] * 2, np.float32)
  np.testing.assert_array_equal(masks_lib.roi_align(maps, whole, 8), maps)
  blocks = maps.reshape(2, 4, 2, 4, 2).mean(axis=(2, 4))
  np.testing.assert_allclose(masks_lib.roi_align(maps, whole, 4), blocks, rtol=1e-6)
  np.testing.assert_array_equal(masks_lib.roi_align(maps, whole, 8, indices=[1, 1]),
                                maps[[1, 1]])


def test_roi_align_degenerate_boxes_give_zeros():
  maps = np.ones((3, 8, 8), np.float32)
  boxes = np.array([[2, 2, 2, 6],       # zero width
                    [6, 6, 3, 3],       # inverted (mmcv's CPU kernel raises)
                    [20, 20, 30, 30]],  # outside the map
                   np.float32)
  np.testing.assert_array_equal(masks_lib.roi_align(maps, boxes, 4), 0)
  constant = masks_lib.roi_align(maps, np.array([[1, 2, 7, 5]] * 3, np.float32), 4)
  np.testing.assert_array_equal(constant, 1)


def test_crop_masks_binary():
  _, _, masks = _objects(np.random.default_rng(1), 3)
  boxes = np.array([[0, 0, 48, 40]] * 3, np.float32)
  crops = masks_lib.crop_masks(masks, boxes, 8)
  assert crops.dtype == np.float32 and set(np.unique(crops)) <= {0.0, 1.0}


# --- paste ---------------------------------------------------------------------------

def test_paste_of_a_full_mask_fills_its_box():
  ones = np.ones((2, 8, 8), np.float32)
  boxes = np.array([[3, 5, 20, 9], [0, 30, 48, 40]], np.float32)
  for window in (True, False):
    got = masks_lib.paste_masks(ones, boxes, *HW, window=window)
    for m, (x1, y1, x2, y2) in zip(got, boxes.astype(int)):
      want = np.zeros(HW, bool)
      want[y1:y2, x1:x2] = True
      np.testing.assert_array_equal(m, want)


def test_paste_window_matches_whole_image_for_ordinary_boxes():
  rng = np.random.default_rng(2)
  masks = rng.random((4, 8, 8)).astype(np.float32)
  boxes, _, _ = _objects(rng, 4)
  boxes = boxes + rng.uniform(-0.5, 0.5, boxes.shape).astype(np.float32)
  window = masks_lib.paste_probabilities(masks, boxes, *HW)
  whole = masks_lib.paste_probabilities(masks, boxes, *HW, window=False)
  inside = window != 0
  np.testing.assert_array_equal(window[inside], whole[inside])
  assert np.all(whole[~inside] < 0.5)


def test_paste_degenerate_boxes_do_not_fail():
  masks = np.ones((3, 8, 8), np.float32)
  boxes = np.array([[10, 5, 10, 20],   # zero width: the centre column
                    [30, 20, 10, 5],   # inverted: the reference's CPU branch raises
                    [60, 50, 70, 60]],  # past the bottom-right edge: likewise
                   np.float32)
  window = masks_lib.paste_masks(masks, boxes, *HW)
  assert window[0].any() and not window[1:].any()
  assert np.all(np.nonzero(window[0])[1] <= 11)
  whole = masks_lib.paste_masks(masks, boxes, *HW, window=False)
  assert whole[0].sum() > window[0].sum() and not whole[2].any()


# --- sequences -----------------------------------------------------------------------

@pytest.mark.parametrize("supervision", detection.MASK_SUPERVISION)
@pytest.mark.parametrize("mask_before_label", [False, True])
def test_seq_aug_sequences(supervision, mask_before_label):
  task = dataclasses.replace(TASK, mask_supervision=supervision,
                             mask_before_label=mask_before_label)
  layout = task.layout
  rng = np.random.default_rng(3)
  counts = (2, 0, 7)
  objs, seqs = _batch(rng, counts, task)
  b, q, t = len(counts), task.num_query, task.mask_token_length
  assert seqs.crops.shape == (b, q, 8, 8) and seqs.has_mask.all()
  inputs, targets = jax.jit(lambda *a: insseg.add_mask_codes(task, *a, encode))(
      seqs.input_seq, seqs.target_seq, seqs.crops, seqs.has_mask)
  inputs = np.pad(np.asarray(inputs), ((0, 0), (0, 1))).reshape(b, q, layout.length)
  targets = np.asarray(targets).reshape(b, q, layout.length)
  empty_code = int(encode(np.zeros((1, 8, 8), np.float32))[0, 0]) + VOCAB.mask_offset
  expected = np.asarray(encode(seqs.crops.reshape(-1, 8, 8))).reshape(b, q, t)
  expected = expected + VOCAB.mask_offset
  for i, n in enumerate(counts):
    order = seqs.orders[i]
    real = order.num_real
    assert real == min(n, q)
    noise_bad = np.zeros(q, bool)
    noise_bad[real + order.bad_flags] = True
    codes = inputs[i, :, layout.mask_slots]
    if not mask_before_label:
      codes[-1, -1] = expected[i, -1, -1]  # the input's dropped last token
    np.testing.assert_array_equal(codes, expected[i])
    assert np.all((codes >= VOCAB.mask_offset) & (codes < VOCAB.depth_offset))
    # Bad noise boxes have the empty mask; duplicates the crop of their source mask.
    assert np.all(codes[noise_bad] == empty_code)
    assert np.all(seqs.crops[i, noise_bad] == 0)
    with_crop = ~noise_bad
    np.testing.assert_array_equal(
        seqs.crops[i, with_crop],
        masks_lib.crop_masks(objs[i][2], order.boxes[with_crop], 8,
                             order.source[with_crop]))
    np.testing.assert_array_equal(order.source[:real] >= 0, True)
    # Targets: classes always, boxes of real objects, masks per supervision mode.
    labels = targets[i, :, layout.label_slot]
    assert np.all(labels[real:] == VOCAB.noise_label)
    assert np.all(targets[i, real:, :4] == detection.IGNORE)
    assert np.all(targets[i, :real, :4] != detection.IGNORE)
    ignored = np.all(targets[i, :, layout.mask_slots] == detection.IGNORE, axis=1)
    kept = np.all(targets[i, :, layout.mask_slots] == codes, axis=1)
    assert np.all(ignored | kept)
    want = {"default": np.arange(q) >= real, "sup_neg_mask": noise_bad,
            "no_sup_mask": np.ones(q, bool)}[supervision]
    np.testing.assert_array_equal(ignored, want)
  assert seqs.input_seq.shape == (b, q * layout.length - 1)


def test_padding_objects_stay_zero():
  task = dataclasses.replace(TASK, seq_aug=False)
  _, seqs = _batch(np.random.default_rng(4), (1, 3), task)
  inputs, targets = insseg.add_mask_codes(task, seqs.input_seq, seqs.target_seq,
                                          seqs.crops, seqs.has_mask, encode)
  assert inputs.shape == (2, 3 * 9 - 1)
  objs = np.asarray(targets).reshape(2, 3, 9)
  padding = np.pad(np.asarray(inputs), ((0, 0), (0, 1))).reshape(2, 3, 9)[0, 1:]
  assert np.all(padding[:, :4] == 0) and np.all(padding[:, 5:] == 0)  # class: corrupted
  assert np.all(objs[0, 1:, :4] == detection.IGNORE) and np.all(objs[0, 1:, 4] == 0)
  assert np.all(objs[0, 1:, 5:] == detection.IGNORE)
  assert np.all(objs[1] != detection.IGNORE)


# --- loss ----------------------------------------------------------------------------

def _logits_and_targets(rng, counts, task=TASK):
  objs, seqs = _batch(rng, counts, task)
  _, targets = insseg.add_mask_codes(task, seqs.input_seq, seqs.target_seq, seqs.crops,
                                     seqs.has_mask, encode)
  logits = rng.normal(0, 2, targets.shape + (VOCAB.size,)).astype(np.float32)
  return logits, np.asarray(targets), seqs.crops


def _np_decoder_term(task, logits, targets, crops):
  """The reference's decoder loss of one image, transcribed in numpy."""
  layout, t = task.layout, task.mask_token_length
  objs = targets.reshape(-1, layout.length)[:, layout.mask_slots]
  num_pos_mask = int(np.sum(objs != detection.IGNORE))
  num_obj = min(num_pos_mask // t, task.max_obj_decoderloss)
  if num_obj == 0:
    return 0.0, 0.0
  code_logits = logits.reshape(-1, layout.length, VOCAB.size)[:num_obj, layout.mask_slots,
                                                              VOCAB.mask_codes]
  p = np.asarray(decode_soft(code_logits), np.float64)
  g = crops[:num_obj].astype(np.float64)
  c = np.clip(p, 0, 1).reshape(num_obj, -1)
  dice = np.mean(1 - (2 * (c * g.reshape(num_obj, -1)).sum(-1) + 1)
                 / (c.sum(-1) + g.reshape(num_obj, -1).sum(-1) + 1))
  aux = task.dice_loss_weight * dice + np.mean((p - g) ** 2)
  return aux, aux * task.decoder_loss_weight * num_pos_mask * task.mask_weight


@pytest.mark.parametrize("max_obj", [100, 2])
def test_loss_closed_form_batch_of_one(max_obj):
  task = dataclasses.replace(TASK, max_obj_decoderloss=max_obj, loss_weight=0.8)
  logits, targets, crops = _logits_and_targets(np.random.default_rng(5), (3,), task)
  got = jax.jit(lambda x, y, c: insseg.sequence_loss(task, x, y, c, decode_soft))(
      logits, targets, crops)
  ce = jax.jit(lambda x, y: detection.sequence_loss(
      x, y, task.layout, class_weights=task.class_weights))(logits, targets)
  aux, term = _np_decoder_term(task, logits[0], targets[0], crops[0])
  np.testing.assert_allclose(got["decoder_aux_ce"], aux, rtol=1e-5)
  np.testing.assert_allclose(got["loss"], (float(ce["loss"]) + term) * 0.8, rtol=1e-5)
  for k in ("bbox_ce", "cls_ce", "mask_ce", "num_targets"):
    np.testing.assert_allclose(got[k], ce[k], rtol=1e-6)


def test_loss_of_a_batch_is_the_sum_of_its_images():
  logits, targets, crops = _logits_and_targets(np.random.default_rng(6), (3, 0, 2))
  loss = jax.jit(lambda *a: insseg.sequence_loss(TASK, *a, decode_soft)["loss"])
  whole = loss(logits, targets, crops)
  parts = [loss(logits[i:i + 1], targets[i:i + 1], crops[i:i + 1]) for i in range(3)]
  np.testing.assert_allclose(whole, sum(parts), rtol=1e-5)


def test_loss_without_decoder_term():
  task = dataclasses.replace(TASK, decoder_loss_weight=0.0)
  logits, targets, _ = _logits_and_targets(np.random.default_rng(7), (2, 1), task)
  got = jax.jit(lambda x, y: insseg.sequence_loss(task, x, y))(logits, targets)
  ce = jax.jit(lambda x, y: detection.sequence_loss(
      x, y, task.layout, class_weights=task.class_weights))(logits, targets)
  np.testing.assert_allclose(got["loss"], ce["loss"], rtol=1e-6)
  assert float(got["decoder_aux_ce"]) == 0


# --- post-processing, config ---------------------------------------------------------

def test_instances():
  layout = TASK.layout
  tokens = np.zeros((2, layout.length), np.int64)
  tokens[:, :4] = [[1, 2, 5, 6], [0, 0, 8, 4]]  # bins of 4 px
  tokens[:, 4] = [2, 0]
  mask_pred = np.ones((2, 8, 8), np.float32)
  bboxes, labels, masks = insseg.instances(TASK, tokens, [0.9, 0.3], mask_pred, (20, 24),
                                           scale_factor=[2, 2, 2, 2])
  np.testing.assert_array_equal(labels, [2, 0])
  np.testing.assert_array_equal(bboxes[:, :4], [[2, 4, 10, 12], [0, 0, 16, 8]])
  assert masks.shape == (2, 20, 24)
  want = np.zeros((20, 24), bool)
  want[4:12, 2:10] = True
  np.testing.assert_array_equal(masks[0], want)
  bboxes, labels, masks = insseg.instances(TASK, tokens.reshape(-1)[:5], [], mask_pred,
                                           (20, 24))
  assert bboxes.shape == (0, 5) and labels.shape == (0,) and masks.shape == (0, 20, 24)


def test_from_reference():
  kw = dict(num_classes=3, num_bins=16, norm_val=64, seq_aug=True, sup_neg_mask=True,
            vae_cfg=dict(type="VQVAE", token_length=4, mask_size=8, num_embeddings=8))
  task = insseg.InsSegTask.from_reference(kw, VOCAB)
  assert (task.mask_supervision, task.mask_size, task.mask_token_length) == (
      "sup_neg_mask", 8, 4)
  assert insseg.InsSegTask.from_reference({**kw, "no_sup_mask": True},
                                          VOCAB).mask_supervision == "no_sup_mask"
  with pytest.raises(ValueError, match="num_embeddings"):
    insseg.InsSegTask.from_reference({**kw, "vae_cfg": dict(num_embeddings=9)}, VOCAB)
  with pytest.raises(ValueError, match="square"):
    dataclasses.replace(TASK, mask_token_length=5)
  np.testing.assert_array_equal(
      task.class_weights[[0, 16, 17, 20, 21, 22, 29, 30]], [1, 1, 1, 1, 1, 1, 1, 1])
  assert TASK.class_weights[VOCAB.mask_offset] == np.float32(0.2)
