"""Object sequences: detection, and the machinery instance segmentation extends.

After the reference's `DetHead` (`ait/code/model/detection/det_head.py`). An object is
`[x1, y1, x2, y2 bins, class]`, plus T mask codes for instance segmentation
(`ObjectLayout`); an image's sequence is its objects one after the other.

Where things run:
* Sequences (`object_sequences`) are built on the host in numpy, in the input
  pipeline. With `seq_aug` every image has `num_query` objects, so each record can be
  done alone (a batch of one); without it, images are padded to the batch's largest.
  Randomness comes from an explicit `np.random.Generator`; the permutation and
  label-corruption draws can be injected (`SequenceDraws`) to replay a recorded run.
* The loss (`sequence_loss`) is jit-able JAX on static shapes.
* Post-processing (`detections`, `split_by_class`) is numpy, for evaluation on the
  host.

Training sequences, as `get_seq` makes them. The real objects are shuffled. With
`seq_aug` (the released configs) they are followed by Pix2Seq noise objects up to
`num_query` (`boxes.noise_boxes`, class `noise_label`); without it, sequences are
zero-padded to the batch's largest object count. The input sequence has every class
slot corrupted (`corrupt_labels`) and its last token dropped; the target is the clean
sequence with the box slots of noise and padding objects ignored (-100). Padding
objects keep their class slot 0 (a bin token) as a target, as in the reference.

Deliberate differences from the reference: with `seq_aug`, an image with more than
`num_query` objects keeps the first `num_query` after the shuffle (the reference
fails); empty predictions give `(0, 5)` boxes (the reference: an empty 1-D tensor);
the caller's box and label lists are not shuffled in place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ait_jax.models.vocab import Vocab
from ait_jax.tasks import boxes as boxes_lib

IGNORE = -100  # target value of positions without a loss
LABEL_CORRUPTIONS = ("none", "rand_cls", "rand_n_fake_cls", "real_n_fake_cls")
MASK_SUPERVISION = ("default", "sup_neg_mask", "no_sup_mask")


@dataclasses.dataclass(frozen=True)
class ObjectLayout:
  """Token slots of one object: 4 box bins, the class, then T mask codes; with
  `mask_before_label` the mask codes come before the class."""
  mask_token_length: int = 0
  mask_before_label: bool = False

  @property
  def length(self) -> int:
    return 5 + self.mask_token_length

  @property
  def label_slot(self) -> int:
    return 4 + self.mask_token_length if self.mask_before_label else 4

  @property
  def mask_slots(self) -> slice:
    start = 4 if self.mask_before_label else 5
    return slice(start, start + self.mask_token_length)

  def slot_kinds(self, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(is_box, is_label, is_mask) boolean masks of the positions [0, seq_len)."""
    slot = np.arange(seq_len) % self.length
    is_mask = (slot >= self.mask_slots.start) & (slot < self.mask_slots.stop)
    return slot < 4, slot == self.label_slot, is_mask


@dataclasses.dataclass(frozen=True)
class DetTask:
  """Detection head settings (the reference `DetHead` keywords)."""
  vocab: Vocab
  norm_val: float = 1333
  num_query: int = 100
  loss_weight: float = 1.0
  seq_aug: bool = False
  label_corruption: str = "rand_n_fake_cls"

  def __post_init__(self):
    check_choice("label_corruption", self.label_corruption, LABEL_CORRUPTIONS)

  @property
  def layout(self) -> ObjectLayout:
    return ObjectLayout()

  @property
  def mask_supervision(self) -> str:
    return "default"  # there are no mask slots

  @classmethod
  def from_reference(cls, kwargs: Mapping, vocab: Vocab) -> DetTask:
    """From `DetHead` keywords (an AiT config's `task_heads['det']`)."""
    kw = reference_keywords("DetHead", kwargs, _DET_DEFAULTS, vocab)
    return cls(vocab=vocab, norm_val=kw["norm_val"], num_query=int(kw["num_query"]),
               loss_weight=float(kw["loss_weight"]), seq_aug=bool(kw["seq_aug"]),
               label_corruption=kw["class_label_corruption"])


# DetHead's constructor defaults. Ignored: the registry and module plumbing, and
# `sync_cls_avg_factor` (the loss is normalised over the global batch, see
# `normalized_loss`) and `with_mask` (the padding mask, unused by the transformer).
_DET_DEFAULTS = dict(type="DetHead", task_id=0, num_classes=None, loss_weight=1.0,
                     num_query=100, num_bins=2000, coord_norm="abs", norm_val=1333,
                     transformer=None, sync_cls_avg_factor=False, with_mask=True,
                     init_cfg=None, seq_aug=None, class_label_corruption="rand_n_fake_cls")


def check_choice(name: str, value, choices):
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not one of {choices}")


def reference_keywords(head: str, kwargs: Mapping, defaults: Mapping, vocab: Vocab) -> dict:
  """A reference head's keywords with its defaults, checked against the vocabulary."""
  unknown = [k for k in kwargs if k not in defaults]
  if unknown:
    raise ValueError(f"{head}: unknown keywords {unknown}")
  kw = {**defaults, **kwargs}
  problems = []
  if kw["coord_norm"] != "abs":
    problems.append(f"coord_norm={kw['coord_norm']!r} (the reference supports only 'abs')")
  for key, have in (("num_classes", vocab.num_classes), ("num_bins", vocab.num_bins)):
    if kw[key] != have:
      problems.append(f"{key}={kw[key]} but the vocabulary has {have}")
  if problems:
    raise ValueError(f"{head}: " + "; ".join(problems))
  return kw


# --- sequences (numpy, host) -------------------------------------------------------

class SequenceDraws(NamedTuple):
  """The random draws of `get_seq` besides the noise objects, in the reference's
  shapes: a permutation of each image's objects, then per object slot a random class
  and a uniform number (< 0.5 picks the random class)."""
  perms: tuple[np.ndarray, ...]
  randint: np.ndarray  # (B, num_slots) int, in [0, num_classes)
  rand: np.ndarray     # (B, num_slots) float32, in [0, 1)


def draw_sequence_randomness(rng: np.random.Generator, num_objects: Sequence[int],
                             num_slots: int, num_classes: int) -> SequenceDraws:
  b = len(num_objects)
  return SequenceDraws(perms=tuple(rng.permutation(int(n)) for n in num_objects),
                       randint=rng.integers(0, num_classes, (b, num_slots)),
                       rand=rng.random((b, num_slots), dtype=np.float32))


class ObjectOrder(NamedTuple):
  """One image's objects in sequence order: its real objects, then noise objects."""
  boxes: np.ndarray     # (m, 4) float32 pixels
  source: np.ndarray    # (m,) int32 index of the caller's object: the object itself,
                        # or the one a duplicate jitters; -1 for bad noise boxes
  num_real: int
  bad_flags: np.ndarray  # int indices, among the noise objects, of the bad boxes


def order_objects(boxes, img_hw, perm, *, num_query: int, seq_aug: bool,
                  rng: np.random.Generator | None) -> ObjectOrder:
  """The real objects in `perm` order, plus the noise objects with `seq_aug`."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  perm = np.asarray(perm, np.int64)
  if not seq_aug:
    return ObjectOrder(boxes[perm], perm.astype(np.int32), len(perm),
                       np.zeros((0,), np.int64))
  real = perm[:num_query]
  noise = boxes_lib.noise_boxes(rng, boxes[real], img_hw, num_query - len(real))
  noise_source = np.full(len(noise.source), -1, np.int64)
  dup = noise.source >= 0
  noise_source[dup] = real[noise.source[dup]]
  return ObjectOrder(np.concatenate([boxes[real], noise.boxes]),
                     np.concatenate([real, noise_source]).astype(np.int32), len(real),
                     np.flatnonzero(noise.is_bad))


def object_rows(order: ObjectOrder, labels, vocab: Vocab, layout: ObjectLayout,
                norm_val: float) -> np.ndarray:
  """(m, obj_len) int32 tokens of ordered objects; mask slots are left 0.

  Real objects carry `label + class_offset`, noise objects `noise_label`.
  """
  labels = np.asarray(labels, np.int64)
  m = len(order.boxes)
  rows = np.zeros((m, layout.length), np.int32)
  rows[:, :4] = boxes_lib.quantize(order.boxes, norm_val, vocab.num_bins)
  real = labels[order.source[:order.num_real]] + vocab.class_offset
  rows[:, layout.label_slot] = np.concatenate(
      [real, np.full(m - order.num_real, vocab.noise_label)])
  return rows


def pad_objects(rows: Sequence[np.ndarray], num_slots: int) -> np.ndarray:
  """(B, num_slots * obj_len) int32: each image's rows flattened, zero-padded."""
  obj_len = rows[0].shape[1]
  out = np.zeros((len(rows), num_slots * obj_len), np.int32)
  for i, r in enumerate(rows):
    out[i, :r.size] = r.reshape(-1)
  return out


def corrupt_labels(seqs: np.ndarray, vocab: Vocab, layout: ObjectLayout, mode: str,
                   randint: np.ndarray, rand: np.ndarray) -> np.ndarray:
  """Sequences with the class slot of every object, padding included, corrupted
  for the input side (a copy).

  `rand_n_fake_cls`: a random class where `rand < 0.5`, else `noise_label`;
  `rand_cls`: a random class; `real_n_fake_cls`: the true class where `rand < 0.5`,
  else `noise_label`; `none`: unchanged.
  """
  check_choice("label_corruption", mode, LABEL_CORRUPTIONS)
  out = np.array(seqs, np.int32)
  if mode == "none":
    return out
  objs = out.reshape(len(out), -1, layout.length)
  random_class = np.asarray(randint) + vocab.class_offset
  if mode == "rand_cls":
    new = random_class
  else:
    keep = random_class if mode == "rand_n_fake_cls" else objs[:, :, layout.label_slot]
    new = np.where(np.asarray(rand) < 0.5, keep, vocab.noise_label)
  objs[:, :, layout.label_slot] = new
  return out


def object_targets(seqs: np.ndarray, num_real: Sequence[int], layout: ObjectLayout, *,
                   mask_supervision: str = "default",
                   bad_flags: Sequence[np.ndarray] | None = None) -> np.ndarray:
  """Targets of clean sequences: -100 where there is no loss (`get_targets`).

  The box slots of objects past an image's `num_real` are ignored; the class slots
  never are. Mask slots: `default` ignores those of objects past `num_real`;
  `sup_neg_mask` only those of the bad noise boxes (objects `num_real + bad_flags`),
  so that duplicates learn their masks; `no_sup_mask` ignores every mask slot.
  """
  check_choice("mask_supervision", mask_supervision, MASK_SUPERVISION)
  out = np.array(seqs, np.int32)
  objs = out.reshape(len(out), -1, layout.length)
  masks = layout.mask_slots
  for i, n in enumerate(num_real):
    objs[i, n:, :4] = IGNORE
    if mask_supervision == "no_sup_mask":
      objs[i, :, masks] = IGNORE
    elif mask_supervision == "sup_neg_mask":
      flags = np.zeros((0,), np.int64) if bad_flags is None else np.asarray(bad_flags[i])
      objs[i, n + flags, masks] = IGNORE
    else:
      objs[i, n:, masks] = IGNORE
  return out


class ObjectSequences(NamedTuple):
  input_seq: np.ndarray   # (B, num_slots * obj_len - 1) int32, class slots corrupted
  target_seq: np.ndarray  # (B, num_slots * obj_len) int32, -100 where ignored
  orders: tuple[ObjectOrder, ...]


def object_sequences(task, boxes: Sequence, labels: Sequence, img_shapes, *,
                     rng: np.random.Generator | None = None,
                     draws: SequenceDraws | None = None) -> ObjectSequences:
  """Training sequences of a batch (the reference's `get_seq`).

  `task` is a `DetTask` or an `insseg.InsSegTask`; boxes (n_i, 4) pixels and labels
  (n_i,) 0-based classes per image; img_shapes (B, >=2) the resized image sizes
  `(h, w)`. `draws` replaces the permutation and corruption draws of `rng`; the noise
  objects of `seq_aug` always come from `rng`. Mask slots are left 0.
  """
  counts = [len(np.asarray(lab).reshape(-1)) for lab in labels]
  num_slots = task.num_query if task.seq_aug else max(counts)
  if draws is None:
    if rng is None:
      raise ValueError("object_sequences needs a numpy Generator `rng` or `draws`")
    draws = draw_sequence_randomness(rng, counts, num_slots, task.vocab.num_classes)
  elif task.seq_aug and rng is None:
    raise ValueError("seq_aug draws its noise objects from `rng`; pass one")
  orders = tuple(
      order_objects(b, hw, perm, num_query=task.num_query, seq_aug=task.seq_aug, rng=rng)
      for b, hw, perm in zip(boxes, np.asarray(img_shapes)[:, :2], draws.perms))
  rows = [object_rows(o, lab, task.vocab, task.layout, task.norm_val)
          for o, lab in zip(orders, labels)]
  seqs = pad_objects(rows, num_slots)
  inputs = corrupt_labels(seqs, task.vocab, task.layout, task.label_corruption,
                          draws.randint, draws.rand)[:, :-1]
  # Padding objects are supervised like bad noise boxes: no box and no mask.
  padding = [np.arange(len(o.boxes), num_slots) - o.num_real for o in orders]
  targets = object_targets(seqs, [o.num_real for o in orders], task.layout,
                           mask_supervision=task.mask_supervision,
                           bad_flags=[np.concatenate([o.bad_flags, p])
                                      for o, p in zip(orders, padding)])
  return ObjectSequences(inputs, targets, orders)


# --- loss (JAX, jit-able) ----------------------------------------------------------

def sequence_loss(logits, targets, layout: ObjectLayout, *, class_weights=None,
                  loss_weight: float = 1.0) -> dict[str, jax.Array]:
  """The reference `loss2`: summed (class-weighted) cross-entropy over the targets.

  logits (B, L, V), targets (B, L) with -100 ignored, L a multiple of the object
  length. `loss` is the weighted sum times `loss_weight`, not normalised (see
  `normalized_loss`). `bbox_ce`, `cls_ce` and, with mask slots, `mask_ce` are the
  weighted sums over those slots divided by their target counts, for logging.
  `num_targets` counts the targets.
  """
  logits = jnp.asarray(logits, jnp.float32)
  targets = jnp.asarray(targets)
  valid = targets != IGNORE
  safe = jnp.where(valid, targets, 0)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  if class_weights is not None:
    nll = nll * jnp.asarray(class_weights, jnp.float32)[safe]
  nll = jnp.where(valid, nll, 0.0)

  is_box, is_label, is_mask = layout.slot_kinds(targets.shape[-1])

  def per_target(kind):
    return jnp.sum(jnp.where(kind, nll, 0.0)) / jnp.maximum(jnp.sum(valid & kind), 1)

  out = {"loss": jnp.sum(nll) * loss_weight, "bbox_ce": per_target(is_box),
         "cls_ce": per_target(is_label), "num_targets": jnp.sum(valid)}
  if layout.mask_token_length:
    out["mask_ce"] = per_target(is_mask)
  return out


def normalized_loss(loss, num_targets):
  """AiT's normalisation of a task loss: divided by its number of targets (>= 1).

  Over the global batch this equals the reference's DDP training, which divides each
  GPU's loss by the mean count per GPU and averages the gradients.
  """
  return loss / jnp.maximum(num_targets, 1)


# --- post-processing (numpy, host) -------------------------------------------------

def parse_objects(tokens, layout: ObjectLayout):
  """(box tokens (N, 4), classes (N,), mask tokens (N, T)) of a predicted sequence
  whose tokens are relative to their slot's vocabulary slice. Trailing tokens of an
  incomplete object are dropped."""
  tokens = np.asarray(tokens).reshape(-1)
  n = len(tokens) // layout.length
  objs = tokens[:n * layout.length].reshape(n, layout.length).astype(np.int64)
  return objs[:, :4], objs[:, layout.label_slot], objs[:, layout.mask_slots]


def detections(task, tokens, scores, scale_factor=None) -> tuple[np.ndarray, np.ndarray]:
  """(bboxes (N, 5) float32 `x1, y1, x2, y2, score`, labels (N,)) of one image.

  `task` is a `DetTask` or an `insseg.InsSegTask`. `tokens` is the image's predicted
  sequence (relative tokens), `scores` its class scores per object. Boxes are in
  resized-image pixels, divided by the 4-vector `scale_factor` when given (the
  reference's `rescale`). No clipping or reordering: an inverted prediction stays
  inverted.
  """
  box_tokens, classes, _ = parse_objects(tokens, task.layout)
  bboxes = boxes_lib.dequantize(box_tokens, task.norm_val, task.vocab.num_bins)
  if scale_factor is not None:
    bboxes = bboxes / np.asarray(scale_factor, np.float32)
  scores = np.asarray(scores, np.float32).reshape(-1)[:len(bboxes), None]
  return np.concatenate([bboxes.reshape(-1, 4), scores], axis=1), classes


def split_by_class(labels, num_classes: int, values) -> list[np.ndarray]:
  """values[labels == c] for each class c (mmdet's `bbox2result`, AiT's `mask2result`)."""
  labels = np.asarray(labels)
  values = np.asarray(values)
  return [values[labels == c] for c in range(num_classes)]
