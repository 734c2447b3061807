"""Training sequences in the input pipeline (input_pipeline/transforms_sequences.py)."""

import os

import numpy as np
import pytest

import input_pipeline as ip
from ait_jax.models.vocab import Vocab
from ait_jax.tasks import boxes as boxes_lib
from ait_jax.tasks import detection
from ait_jax.tasks import insseg
from ait_jax.tasks import masks as masks_lib
from input_pipeline import synthetic
from input_pipeline import transforms_insseg
from input_pipeline.transforms_common import Compose
from input_pipeline.transforms_sequences import ObjectSequences

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning")

VOCAB = Vocab(num_bins=64, num_classes=3, num_mask_codes=8, num_depth_codes=0, size=80)
INSSEG = insseg.InsSegTask(VOCAB, mask_size=8, mask_token_length=4, norm_val=64,
                           num_query=8, seq_aug=True)
DET = detection.DetTask(VOCAB, norm_val=64, num_query=8, seq_aug=True)
SIZE = 64


def _record(boxes, labels, h=100, w=100, seed=0):
  """A source record (uint8 image, boxes, labels, crowd, masks filling the boxes)."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  masks = np.zeros((len(boxes), h, w), np.uint8)
  for m, (x1, y1, x2, y2) in zip(masks, boxes.astype(int)):
    m[y1:y2, x1:x2] = 1
  image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
  return {"image": image, "boxes": boxes, "labels": np.asarray(labels, np.int32),
          "crowd": np.zeros(len(boxes), bool), "masks": masks}


def _random_record(n, seed):
  rng = np.random.default_rng(seed)
  xy = rng.uniform(0, 80, (n, 2))
  wh = rng.uniform(4, 20, (n, 2))
  return _record(np.round(np.concatenate([xy, xy + wh], 1)), rng.integers(0, 3, n),
                 seed=seed)


def _ops(task, **kw):
  """The loader's training ops with the sequences inserted, as make_insseg_loader does."""
  ops = transforms_insseg.insseg_train_ops((SIZE, SIZE), max_instances=16,
                                           mask_crop_size=None, **kw)
  return ops[:-1] + [ObjectSequences(task), ops[-1]]


def _run(ops, record, seed):
  return Compose(ops).random_map(dict(record), np.random.default_rng(seed))


def _objects(out, task):
  """(target objects (N, obj_len), real: the slots whose boxes are supervised)."""
  objs = out["target_seq"].reshape(task.num_query, task.layout.length)
  return objs, objs[:, 0] != detection.IGNORE


def test_same_seed_same_sequences():
  record = _random_record(5, seed=1)
  a, b, c = (_run(_ops(INSSEG), record, s) for s in (3, 3, 4))
  for key in ("input_seq", "target_seq", "seq_mask_crops", "seq_has_mask", "image"):
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["input_seq"], c["input_seq"])


@pytest.mark.parametrize("task", [INSSEG, DET], ids=["insseg", "det"])
def test_fixed_shapes_for_any_object_count(task):
  length = task.num_query * task.layout.length
  for n in (0, 1, 5, 12):  # 12 > num_query: the first num_query after the shuffle
    out = _run(_ops(task), _random_record(n, seed=n), seed=n)
    assert out["input_seq"].shape == (length - 1,) and out["input_seq"].dtype == np.int32
    assert out["target_seq"].shape == (length,) and out["target_seq"].dtype == np.int32
    if task is INSSEG:
      assert out["seq_mask_crops"].shape == (8, 8, 8)
      assert out["seq_mask_crops"].dtype == np.uint8
      assert out["seq_has_mask"].shape == (8,) and out["seq_has_mask"].all()
    else:
      assert "seq_mask_crops" not in out
    assert "masks" not in out  # PadInstances still drops the full masks
    _, real = _objects(out, task)
    assert real.sum() == min(out["num_instances"], task.num_query)


@pytest.mark.parametrize("task", [INSSEG, DET], ids=["insseg", "det"])
def test_input_is_the_corrupted_sequence_without_its_last_token(task):
  out = _run(_ops(task), _random_record(5, seed=2), seed=7)
  inputs, targets = out["input_seq"], out["target_seq"]
  is_box, is_label, is_mask = task.layout.slot_kinds(len(targets))
  supervised_box = is_box & (targets != detection.IGNORE)
  kept = supervised_box[:-1]
  np.testing.assert_array_equal(inputs[kept], targets[:-1][kept])
  assert ((inputs[is_box[:-1]] >= 0) & (inputs[is_box[:-1]] <= VOCAB.num_bins)).all()
  label_in = inputs[is_label[:-1]]
  assert (((label_in >= VOCAB.class_offset) & (label_in < VOCAB.special_offset))
          | (label_in == VOCAB.noise_label)).all()
  assert (inputs[is_mask[:-1]] == 0).all()  # filled later by insseg.add_mask_codes
  objs, real = _objects(out, task)
  assert (objs[~real, task.layout.label_slot] == VOCAB.noise_label).all()


def test_sequences_hold_the_objects_left_after_the_crop():
  # 100x100 scaled to 128x128 (ratio 2), a 64x64 crop: of four corner objects at
  # most one survives; the centre one always does.
  corners = [(0, 0, 20, 20), (80, 0, 100, 20), (0, 80, 20, 100), (80, 80, 100, 100)]
  record = _record(corners + [(40, 40, 60, 60)], [0, 1, 2, 0, 1])
  kept_counts = set()
  for seed in range(6):
    with_seqs = _run(_ops(INSSEG, ratio_range=(2.0, 2.0), keep_masks=True), record, seed)
    plain = _run(transforms_insseg.insseg_train_ops(
        (SIZE, SIZE), (2.0, 2.0), 16, None, keep_masks=True), record, seed)
    n = int(plain["num_instances"])
    kept_counts.add(n)
    np.testing.assert_array_equal(with_seqs["boxes"], plain["boxes"])
    objs, real = _objects(with_seqs, INSSEG)
    boxes, labels, masks = plain["boxes"][:n], plain["labels"][:n], plain["masks"][:n]
    tokens = boxes_lib.quantize(boxes, INSSEG.norm_val, VOCAB.num_bins)
    expected = sorted(map(tuple, np.c_[tokens, labels + VOCAB.class_offset].tolist()))
    got = sorted(map(tuple, objs[real][:, :5].tolist()))
    assert got == expected
    # A real object's crop is its full mask cropped in its box.
    for k in np.flatnonzero(real):
      i = [tuple(t) for t in tokens.tolist()].index(tuple(objs[k, :4]))
      np.testing.assert_array_equal(
          with_seqs["seq_mask_crops"][k],
          masks_lib.crop_masks(masks[i:i + 1], boxes[i:i + 1], INSSEG.mask_size)[0])
  assert kept_counts <= {1, 2} and 1 in kept_counts


def test_refused_without_seq_aug_and_in_evaluation():
  with pytest.raises(ValueError, match="seq_aug"):
    ObjectSequences(detection.DetTask(VOCAB, norm_val=64, num_query=8, seq_aug=False))
  with pytest.raises(ValueError, match="training targets"):
    ip.make_insseg_loader(None, train=False, sequences=INSSEG,
                          options=ip.LoaderOptions(global_batch_size=1, process_index=0,
                                                   process_count=1))


@pytest.fixture(scope="module")
def coco_train(tmp_path_factory):
  root = synthetic.write_coco(str(tmp_path_factory.mktemp("data")), num_train=4,
                              num_val=0, height=48, width=64)
  return ip.CocoInstancesSource(
      os.path.join(root, "annotations", "instances_train2017.json"),
      os.path.join(root, "train2017"))


def _loader(source, seed=5):
  options = ip.LoaderOptions(global_batch_size=2, seed=seed, read_threads=0,
                             process_index=0, process_count=1)
  return ip.make_insseg_loader(source, train=True, image_size=(SIZE, SIZE),
                               max_instances=6, mask_crop_size=None, sequences=INSSEG,
                               options=options)


def test_loader_batches_sequences_deterministically_and_resumes(coco_train):
  loader = _loader(coco_train)
  first = next(loader)
  state = loader.get_state()
  second = next(loader)
  length = INSSEG.num_query * INSSEG.layout.length
  assert first["input_seq"].shape == (2, length - 1)
  assert first["target_seq"].shape == (2, length)
  assert first["seq_mask_crops"].shape == (2, 8, 8, 8)
  assert first["seq_has_mask"].shape == (2, 8)
  assert "masks" not in first and "mask_crops" not in first
  again = next(_loader(coco_train))
  for key in first:
    np.testing.assert_array_equal(again[key], first[key])
  resumed = _loader(coco_train)
  resumed.set_state(state)
  resumed = next(resumed)
  for key in second:
    np.testing.assert_array_equal(resumed[key], second[key])
