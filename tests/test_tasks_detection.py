"""Unit tests of the object sequences (ait_jax/tasks/detection.py, boxes.py).

Closed forms and invariants; the reference's numbers are in tests/_draft_parity_heads.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ait_jax.models.vocab import Vocab
from ait_jax.tasks import boxes as boxes_lib
from ait_jax.tasks import detection

VOCAB = Vocab(num_bins=20, num_classes=3, num_mask_codes=0, num_depth_codes=0, size=30)
TASK = detection.DetTask(VOCAB, norm_val=64, num_query=6, seq_aug=True)
LAYOUT = detection.ObjectLayout()


def _random_objects(rng, n, hw=(48, 64)):
  h, w = hw
  xy = rng.uniform(0, [w, h], (n, 2))
  wh = rng.uniform(2, 20, (n, 2))
  boxes = np.concatenate([xy, np.minimum(xy + wh, [w, h])], axis=1).astype(np.float32)
  return boxes, rng.integers(0, VOCAB.num_classes, n)


# --- boxes ---------------------------------------------------------------------------

def test_quantize_rounds_half_to_even_and_clamps():
  # 8, 24, 40, 56 of 64 are 2.5, 7.5, 12.5, 17.5 bins of 20.
  got = boxes_lib.quantize([[8, 24, 40, 56], [70, -1, 0, 64]], 64, 20)
  np.testing.assert_array_equal(got, [[2, 8, 12, 18], [20, 0, 0, 20]])


def test_dequantize_inverts_quantize():
  tokens = np.arange(2001)
  for norm_val in (640, 1333, 640.5):
    pixels = boxes_lib.dequantize(tokens, norm_val, 2000)
    assert pixels.dtype == np.float32
    np.testing.assert_array_equal(boxes_lib.quantize(pixels, norm_val, 2000), tokens)


def test_truncated_normal_range():
  x = boxes_lib.truncated_normal(np.random.default_rng(0), (10000,))
  assert x.dtype == np.float32 and np.abs(x).max() <= 2 and 0.8 < x.std() < 0.9


@pytest.mark.parametrize("n,num_noise", [(0, 5), (1, 7), (3, 2), (4, 0)])
def test_noise_boxes(n, num_noise):
  rng = np.random.default_rng(n)
  hw = (48, 64)
  boxes, _ = _random_objects(rng, n, hw)
  noise = boxes_lib.noise_boxes(rng, boxes, hw, num_noise)
  assert noise.boxes.shape == (num_noise, 4) and noise.boxes.dtype == np.float32
  assert np.all(noise.boxes >= 0) and np.all(noise.boxes <= boxes_lib.image_scale(hw))
  np.testing.assert_array_equal(noise.is_bad, noise.source < 0)
  if n == 0:
    assert noise.is_bad.all()
  dup = ~noise.is_bad
  assert np.all(noise.source[dup] < n)
  # A duplicate is its source jittered by at most 10% of its size (then clipped).
  src = boxes[noise.source[dup]]
  size = np.concatenate([src[:, 2:] - src[:, :2]] * 2, axis=1)
  assert np.all(np.abs(noise.boxes[dup] - src) <= 0.1 * size + 1e-5)


def test_noise_box_mix_is_uniform_in_duplicates():
  rng = np.random.default_rng(0)
  boxes, _ = _random_objects(rng, 2)
  dups = [int(np.sum(~boxes_lib.noise_boxes(rng, boxes, (48, 64), 4).is_bad))
          for _ in range(500)]
  counts = np.bincount(dups, minlength=5)
  assert counts.min() > 60  # 0..4 duplicates, 100 expected each


# --- sequences -----------------------------------------------------------------------

def test_layout_slots():
  for t, mbl in ((0, False), (16, False), (16, True)):
    layout = detection.ObjectLayout(t, mbl)
    is_box, is_label, is_mask = layout.slot_kinds(3 * layout.length)
    assert np.all(is_box.astype(int) + is_label + is_mask == 1)
    assert is_mask.sum() == 3 * t and is_label.sum() == 3
    assert np.flatnonzero(is_label)[0] == (4 + t if mbl else 4)


@pytest.mark.parametrize("mode", detection.LABEL_CORRUPTIONS)
def test_corrupt_labels_changes_only_class_slots(mode):
  rng = np.random.default_rng(1)
  seqs = rng.integers(0, VOCAB.class_offset, (2, 4 * 5)).astype(np.int32)
  seqs[:, 4::5] = rng.integers(VOCAB.class_offset, VOCAB.special_offset, (2, 4))
  randint = rng.integers(0, VOCAB.num_classes, (2, 4))
  rand = rng.random((2, 4), dtype=np.float32)
  out = detection.corrupt_labels(seqs, VOCAB, LAYOUT, mode, randint, rand)
  _, is_label, _ = LAYOUT.slot_kinds(seqs.shape[1])
  np.testing.assert_array_equal(out[:, ~is_label], seqs[:, ~is_label])
  noise = np.full((2, 4), VOCAB.noise_label)
  want = {"none": seqs[:, is_label],
          "rand_cls": randint + VOCAB.class_offset,
          "rand_n_fake_cls": np.where(rand < 0.5, randint + VOCAB.class_offset, noise),
          "real_n_fake_cls": np.where(rand < 0.5, seqs[:, is_label], noise)}[mode]
  np.testing.assert_array_equal(out[:, is_label], want)


def test_object_targets_ignore_box_slots_past_real_objects():
  seqs = np.arange(2 * 4 * 5, dtype=np.int32).reshape(2, 20)
  out = detection.object_targets(seqs, [1, 4], LAYOUT).reshape(2, 4, 5)
  assert np.all(out[0, 1:, :4] == detection.IGNORE)
  np.testing.assert_array_equal(out[0, :1], seqs.reshape(2, 4, 5)[0, :1])
  np.testing.assert_array_equal(out[1], seqs.reshape(2, 4, 5)[1])
  np.testing.assert_array_equal(out[:, :, 4], seqs.reshape(2, 4, 5)[:, :, 4])


def test_sequences_without_seq_aug_pad_to_the_largest_image():
  rng = np.random.default_rng(2)
  objs = [_random_objects(rng, n) for n in (3, 0, 2)]
  task = detection.DetTask(VOCAB, norm_val=64, num_query=6)
  seqs = detection.object_sequences(task, [b for b, _ in objs], [lab for _, lab in objs],
                                    np.array([[48, 64, 3]] * 3), rng=rng)
  assert seqs.input_seq.shape == (3, 14) and seqs.target_seq.shape == (3, 15)
  tgt = seqs.target_seq.reshape(3, 3, 5)
  assert np.all(tgt[1, :, :4] == detection.IGNORE) and np.all(tgt[1, :, 4] == 0)
  for i, (b, lab) in enumerate(objs):
    order = seqs.orders[i]
    np.testing.assert_array_equal(tgt[i, :len(b), 4],
                                  lab[order.source] + VOCAB.class_offset)
    np.testing.assert_array_equal(tgt[i, :len(b), :4], boxes_lib.quantize(b[order.source],
                                                                           64, 20))
  # The input is the corrupted target without its last token.
  _, is_label, _ = LAYOUT.slot_kinds(14)
  clean = np.where(seqs.target_seq == detection.IGNORE, -1, seqs.target_seq)[:, :14]
  kept = ~is_label[None] & (clean >= 0)
  np.testing.assert_array_equal(seqs.input_seq[kept], clean[kept])


@pytest.mark.parametrize("counts", [(3, 0, 6), (8, 1)])
def test_seq_aug_invariants(counts):
  rng = np.random.default_rng(sum(counts))
  hw = (48, 64)
  objs = [_random_objects(rng, n, hw) for n in counts]
  seqs = detection.object_sequences(TASK, [b for b, _ in objs], [lab for _, lab in objs],
                                    np.array([[*hw, 3]] * len(counts)), rng=rng)
  q = TASK.num_query
  assert seqs.input_seq.shape == (len(counts), q * 5 - 1)
  tgt = seqs.target_seq.reshape(len(counts), q, 5)
  inp = np.pad(seqs.input_seq, ((0, 0), (0, 1))).reshape(len(counts), q, 5)
  for i, n in enumerate(counts):
    real = min(n, q)  # more than num_query objects: the first num_query are kept
    assert seqs.orders[i].num_real == real
    classes = tgt[i, :, 4]
    assert np.all((classes[:real] >= VOCAB.class_offset)
                  & (classes[:real] < VOCAB.special_offset))
    assert np.all(classes[real:] == VOCAB.noise_label)
    assert np.all(tgt[i, real:, :4] == detection.IGNORE)
    assert np.all((tgt[i, :real, :4] >= 0) & (tgt[i, :real, :4] <= VOCAB.num_bins))
    # Input boxes of every object are bins; noise boxes lie in the image.
    assert np.all((inp[i, :, :4] >= 0) & (inp[i, :, :4] <= VOCAB.num_bins))
    limit = boxes_lib.quantize(boxes_lib.image_scale(hw), TASK.norm_val, VOCAB.num_bins)
    assert np.all(inp[i, real:, :4] <= limit)
    # Input classes are corrupted: a class or the noise label (the last one dropped).
    labels = inp[i, :-1, 4]
    assert np.all(((labels >= VOCAB.class_offset) & (labels < VOCAB.special_offset))
                  | (labels == VOCAB.noise_label))


def test_injected_draws_reproduce_sequences():
  rng = np.random.default_rng(3)
  objs = [_random_objects(rng, n) for n in (2, 3)]
  boxes, labels = [b for b, _ in objs], [lab for _, lab in objs]
  shapes = np.array([[48, 64, 3]] * 2)
  draws = detection.draw_sequence_randomness(rng, [2, 3], TASK.num_query, 3)
  a = detection.object_sequences(TASK, boxes, labels, shapes, draws=draws,
                                 rng=np.random.default_rng(7))
  b = detection.object_sequences(TASK, boxes, labels, shapes, draws=draws,
                                 rng=np.random.default_rng(7))
  np.testing.assert_array_equal(a.input_seq, b.input_seq)
  np.testing.assert_array_equal(a.target_seq, b.target_seq)
  for order, perm in zip(a.orders, draws.perms):
    np.testing.assert_array_equal(order.source[:len(perm)], perm)


# --- loss ----------------------------------------------------------------------------

def _np_weighted_ce(logits, targets, weights):
  logits = logits.astype(np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  valid = targets != detection.IGNORE
  safe = np.where(valid, targets, 0)
  nll = -np.take_along_axis(logp, safe[..., None], -1)[..., 0] * weights[safe]
  return np.where(valid, nll, 0.0), valid


@pytest.mark.parametrize("t,mbl", [(0, False), (4, False), (4, True)])
def test_sequence_loss_closed_form(t, mbl):
  layout = detection.ObjectLayout(t, mbl)
  rng = np.random.default_rng(t)
  b, length, v = 2, 3 * layout.length, 30
  logits = rng.normal(0, 2, (b, length, v)).astype(np.float32)
  targets = rng.integers(0, v, (b, length))
  targets[rng.random((b, length)) < 0.3] = detection.IGNORE
  weights = rng.uniform(0.1, 2, v).astype(np.float32)
  got = jax.jit(lambda x, y: detection.sequence_loss(
      x, y, layout, class_weights=weights, loss_weight=0.7))(logits, targets)
  nll, valid = _np_weighted_ce(logits, targets, weights)
  is_box, is_label, is_mask = layout.slot_kinds(length)
  np.testing.assert_allclose(got["loss"], 0.7 * nll.sum(), rtol=1e-6)
  assert int(got["num_targets"]) == valid.sum()
  for name, kind in (("bbox_ce", is_box), ("cls_ce", is_label), ("mask_ce", is_mask)):
    if name == "mask_ce" and not t:
      assert name not in got
      continue
    want = nll[:, kind].sum() / max(valid[:, kind].sum(), 1)
    np.testing.assert_allclose(got[name], want, rtol=1e-6)


def test_sequence_loss_without_targets_is_zero():
  targets = np.full((1, 10), detection.IGNORE)
  got = detection.sequence_loss(np.zeros((1, 10, 30), np.float32), targets, LAYOUT)
  assert float(got["loss"]) == 0 and float(got["bbox_ce"]) == 0
  assert float(detection.normalized_loss(got["loss"], got["num_targets"])) == 0


def test_sequence_loss_in_bfloat16_is_computed_in_float32():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 10, 30)), jnp.bfloat16)
  targets = np.arange(10)[None]
  got = detection.sequence_loss(logits, targets, LAYOUT)
  assert got["loss"].dtype == jnp.float32


# --- post-processing -----------------------------------------------------------------

def test_detections():
  tokens = np.array([1, 2, 10, 20, 0, 5, 5, 2, 3, 2, 7])  # an inverted box, a stray token
  bboxes, labels = detection.detections(TASK, tokens, np.array([0.9, 0.4, 0.1]),
                                        scale_factor=[0.5, 0.5, 0.5, 0.5])
  np.testing.assert_array_equal(labels, [0, 2])
  np.testing.assert_allclose(bboxes, [[6.4, 12.8, 64, 128, 0.9], [32, 32, 12.8, 19.2, 0.4]],
                             rtol=1e-6)
  bboxes, labels = detection.detections(TASK, tokens[:4], np.zeros(6))
  assert bboxes.shape == (0, 5) and labels.shape == (0,)


def test_split_by_class():
  labels = np.array([2, 0, 2])
  values = np.arange(15.0).reshape(3, 5)
  out = detection.split_by_class(labels, 3, values)
  assert [len(x) for x in out] == [1, 0, 2] and out[1].shape == (0, 5)
  np.testing.assert_array_equal(out[2], values[[0, 2]])


def test_from_reference():
  task = detection.DetTask.from_reference(
      dict(type="DetHead", task_id=0, num_classes=3, num_bins=20, norm_val=640,
           seq_aug=True, sync_cls_avg_factor=True), VOCAB)
  assert task.seq_aug and task.norm_val == 640 and task.num_query == 100
  with pytest.raises(ValueError, match="unknown keywords"):
    detection.DetTask.from_reference(dict(num_classes=3, num_bins=20, bins=1), VOCAB)
  with pytest.raises(ValueError, match="coord_norm"):
    detection.DetTask.from_reference(dict(num_classes=3, num_bins=20, coord_norm="rel"),
                                     VOCAB)
  with pytest.raises(ValueError, match="num_bins=2000"):
    detection.DetTask.from_reference(dict(num_classes=3), VOCAB)
  with pytest.raises(ValueError, match="label_corruption"):
    detection.DetTask(VOCAB, label_corruption="swap")
