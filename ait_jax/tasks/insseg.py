"""Instance segmentation: object sequences with mask codes, after the reference's
`InsSegHead` (`ait/code/model/detection/insseg_head.py`).

An object is `[4 box bins, class, T mask codes]` (`[4 box bins, T mask codes, class]`
with `mask_before_label`). Its mask codes are the VQ-VAE tokens of its binary mask
cropped to its box (`masks.crop_masks`, `mask_size` square).

Where things run:
* `make_sequences` (host, numpy) builds the sequences of `detection.object_sequences`
  and the crop of every object: real objects' GT masks in their boxes; with
  `seq_aug`, jittered duplicates' GT masks in their jittered boxes, and an empty crop
  for random and shifted noise boxes (its code is the reference's `encode(zeros)`).
  The mask slots are still 0 there.
* `add_mask_codes` (JAX, jit-able; in the train step) encodes the crops with the
  frozen VQ-VAE and writes the codes into the mask slots; the crops stay the targets
  of the decoder loss.
* `sequence_loss` (JAX, jit-able) is the reference's `loss2`.
* `instances` (numpy, host) pastes decoded masks back into the image.

Deliberate differences from the reference:
* Without `seq_aug`, the reference's `get_seq` sets no -100 at all (its `get_targets`
  loops over an empty list), so padding objects are all-zero targets; here their box
  and mask slots are ignored like those of noise objects (the class slot stays 0, as
  in detection).
* `loss2` returns None with `mask_before_label`; here it is the same loss with the
  class slot last.
* The decoder loss asserts a batch of 1 and compares the first objects of the batch
  with the crops of the batch's last image. Here each image's objects are compared
  with their own crops and each image adds its term as the reference adds its
  single image's; a batch of 1 gives the reference's value. The decoded objects are
  the first `num_obj` objects with mask targets (the reference: the first `num_obj`
  objects, the same ones unless `sup_neg_mask`, where the reference fails).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ait_jax.models.vocab import Vocab
from ait_jax.tasks import detection
from ait_jax.tasks import masks as masks_lib


def token_class_weights(vocab: Vocab, *, box_weight: float, cls_weight: float,
                        mask_weight: float) -> np.ndarray:
  """(vocab.size,) float32 weights of the cross-entropy over target tokens.

  The reference's InsSegHead keeps this as the `loss_seq.weight` buffer: `box_weight`
  on the coordinate bins, `cls_weight` on the classes and the noise label,
  `mask_weight` on the mask codes and 1 elsewhere.
  """
  w = np.ones((vocab.size,), np.float32)
  w[vocab.bins] = box_weight
  w[vocab.classes] = cls_weight
  w[vocab.noise_label] = cls_weight
  w[vocab.mask_codes] = mask_weight
  return w


@dataclasses.dataclass(frozen=True)
class InsSegTask:
  """Instance-segmentation head settings (the reference `InsSegHead` keywords).

  `mask_size` and `mask_token_length` are the VQ-VAE's (its `vae_cfg`);
  `mask_supervision` is 'default', 'sup_neg_mask' or 'no_sup_mask' (the reference's
  flags of those names).
  """
  vocab: Vocab
  mask_size: int
  mask_token_length: int
  norm_val: float = 1333
  num_query: int = 100
  loss_weight: float = 1.0
  seq_aug: bool = False
  label_corruption: str = "rand_n_fake_cls"
  mask_before_label: bool = False
  mask_supervision: str = "default"
  box_weight: float = 1.0
  cls_weight: float = 1.0
  mask_weight: float = 1.0
  decoder_loss_weight: float = 0.0
  dice_loss_weight: float = 1.0
  max_obj_decoderloss: int = 100

  def __post_init__(self):
    detection.check_choice("label_corruption", self.label_corruption,
                            detection.LABEL_CORRUPTIONS)
    detection.check_choice("mask_supervision", self.mask_supervision,
                            detection.MASK_SUPERVISION)
    g = math.isqrt(self.mask_token_length)
    if g * g != self.mask_token_length:
      raise ValueError(f"mask_token_length {self.mask_token_length} is not a square")

  @property
  def layout(self) -> detection.ObjectLayout:
    return detection.ObjectLayout(self.mask_token_length, self.mask_before_label)

  @property
  def class_weights(self) -> np.ndarray:
    return token_class_weights(self.vocab, box_weight=self.box_weight,
                               cls_weight=self.cls_weight, mask_weight=self.mask_weight)

  @classmethod
  def from_reference(cls, kwargs: Mapping, vocab: Vocab) -> InsSegTask:
    """From `InsSegHead` keywords (an AiT config's `task_heads['insseg']`)."""
    kw = detection.reference_keywords("InsSegHead", kwargs, _INSSEG_DEFAULTS, vocab)
    vae = {**_INSSEG_DEFAULTS["vae_cfg"], **kw["vae_cfg"]}
    if vae["num_embeddings"] != vocab.num_mask_codes:
      raise ValueError(f"InsSegHead: vae_cfg.num_embeddings={vae['num_embeddings']} but "
                       f"the vocabulary has {vocab.num_mask_codes} mask codes")
    supervision = ("no_sup_mask" if kw["no_sup_mask"] else
                   "sup_neg_mask" if kw["sup_neg_mask"] else "default")
    return cls(vocab=vocab, mask_size=int(vae["mask_size"]),
               mask_token_length=int(vae["token_length"]), norm_val=kw["norm_val"],
               num_query=int(kw["num_query"]), loss_weight=float(kw["loss_weight"]),
               seq_aug=bool(kw["seq_aug"]), label_corruption=kw["class_label_corruption"],
               mask_before_label=bool(kw["mask_before_label"]),
               mask_supervision=supervision, box_weight=float(kw["box_weight"]),
               cls_weight=float(kw["cls_weight"]), mask_weight=float(kw["mask_weight"]),
               decoder_loss_weight=float(kw["decoder_loss_weight"]),
               dice_loss_weight=float(kw["dice_loss_weight"]),
               max_obj_decoderloss=int(kw["max_obj_decoderloss"]))


# InsSegHead's constructor defaults. Ignored besides DetHead's: `box_std` and
# `cls_drop`, which the reference never reads.
_INSSEG_DEFAULTS = dict(
    type="InsSegHead", task_id=1, num_classes=None, loss_weight=1.0, num_query=100,
    num_bins=2000, coord_norm="abs", norm_val=1333, transformer=None,
    sync_cls_avg_factor=False, with_mask=True, init_cfg=None,
    vae_cfg=dict(token_length=16, mask_size=64, embedding_dim=64, num_embeddings=256),
    seq_aug=None, box_std=0.2, cls_drop=0.0, mask_before_label=False, sup_neg_mask=False,
    no_sup_mask=False, cls_weight=1.0, box_weight=1.0, mask_weight=1.0,
    class_label_corruption="rand_n_fake_cls", decoder_loss_weight=0.0,
    dice_loss_weight=1.0, max_obj_decoderloss=100)


# --- sequences ---------------------------------------------------------------------

class InsSegSequences(NamedTuple):
  input_seq: np.ndarray   # (B, N * obj_len - 1) int32, mask slots still 0
  target_seq: np.ndarray  # (B, N * obj_len) int32, -100 where ignored, mask slots 0
  crops: np.ndarray       # (B, N, S, S) uint8 binary crop of each object slot
  has_mask: np.ndarray    # (B, N) bool: slots holding an object (not padding)
  orders: tuple[detection.ObjectOrder, ...]


def make_sequences(task: InsSegTask, boxes: Sequence, labels: Sequence, masks: Sequence,
                   img_shapes, *, rng: np.random.Generator | None = None,
                   draws: detection.SequenceDraws | None = None) -> InsSegSequences:
  """Training sequences and object crops of a batch (the reference's `get_seq`).

  As `detection.object_sequences`, with each image's GT masks (n_i, H, W) in the
  order of its boxes. Finish the sequences with `add_mask_codes`.
  """
  seqs = detection.object_sequences(task, boxes, labels, img_shapes, rng=rng, draws=draws)
  b, n = len(seqs.orders), seqs.target_seq.shape[1] // task.layout.length
  s = task.mask_size
  crops = np.zeros((b, n, s, s), np.uint8)
  has_mask = np.zeros((b, n), bool)
  for i, (order, image_masks) in enumerate(zip(seqs.orders, masks)):
    has_mask[i, :len(order.boxes)] = True
    with_crop = np.flatnonzero(order.source >= 0)
    crops[i, with_crop] = masks_lib.crop_masks(image_masks, order.boxes[with_crop], s,
                                               order.source[with_crop])
  return InsSegSequences(seqs.input_seq, seqs.target_seq, crops, has_mask, seqs.orders)


def add_mask_codes(task: InsSegTask, input_seq, target_seq, crops, has_mask,
                   encode: Callable) -> tuple[jax.Array, jax.Array]:
  """(input_seq, target_seq) with the codes of the crops in the mask slots.

  `encode` maps crops (M, S, S) to code indices (M, T), e.g. the frozen VQ-VAE's
  `encode`. Ignored targets stay -100; padding objects stay 0.
  """
  layout, vocab = task.layout, task.vocab
  b, n = has_mask.shape
  crops = jnp.asarray(crops, jnp.float32)
  codes = encode(jnp.reshape(crops, (b * n, task.mask_size, task.mask_size)))
  codes = jnp.reshape(codes, (b, n, task.mask_token_length)) + vocab.mask_offset
  put = jnp.asarray(has_mask)[:, :, None]

  def fill(seq, keep_ignored: bool):
    objs = jnp.reshape(seq, (b, n, layout.length))
    old = objs[:, :, layout.mask_slots]
    new = jnp.where(put & (old != detection.IGNORE) if keep_ignored else put, codes, old)
    return jnp.reshape(objs.at[:, :, layout.mask_slots].set(new.astype(objs.dtype)),
                       (b, -1))

  input_seq = jnp.asarray(input_seq)
  padded = jnp.pad(input_seq, ((0, 0), (0, 1)))
  return fill(padded, False)[:, :input_seq.shape[1]], fill(jnp.asarray(target_seq), True)


# --- loss --------------------------------------------------------------------------

def _dice_and_mse(pred, target):
  """Per object (..., S, S): the reference's dice loss (on pred clipped to [0, 1]) and
  mean squared error (on pred as it is)."""
  clipped = jnp.clip(pred, 0.0, 1.0)
  inter = jnp.sum(clipped * target, axis=(-2, -1))
  total = jnp.sum(clipped, axis=(-2, -1)) + jnp.sum(target, axis=(-2, -1))
  dice = 1.0 - (2.0 * inter + 1.0) / (total + 1.0)
  return dice, jnp.mean((pred - target) ** 2, axis=(-2, -1))


def sequence_loss(task: InsSegTask, logits, targets, crops=None,
                  decode_soft: Callable | None = None) -> dict[str, jax.Array]:
  """The reference's `loss2`: class-weighted cross-entropy plus the decoder loss.

  logits (B, L, V), targets (B, L) (-100 ignored). With `decoder_loss_weight > 0`,
  the first `num_obj = min(mask targets // T, max_obj_decoderloss)` objects with mask
  targets of each image are decoded from their soft codes (`decode_soft`, (M, T, K)
  logits -> (M, S, S), the frozen VQ-VAE's) and compared with their `crops` (B, N,
  S, S): `decoder_aux_ce = dice_loss_weight * dice + mse`. Then
  `loss = (sum CE + decoder_aux_ce * decoder_loss_weight * num_mask_targets *
  mask_weight) * loss_weight` (per image, see the module docstring); normalise it
  with `detection.normalized_loss`. Static shapes: min(N, max_obj_decoderloss)
  objects per image are decoded and the unused ones weighted out.
  """
  layout, vocab = task.layout, task.vocab
  t = task.mask_token_length
  ce = detection.sequence_loss(logits, targets, layout, class_weights=task.class_weights)
  out = {k: ce[k] for k in ("bbox_ce", "cls_ce", "mask_ce", "num_targets")}
  total = ce["loss"]
  aux = jnp.zeros((), jnp.float32)
  if task.decoder_loss_weight > 0:
    if crops is None or decode_soft is None:
      raise ValueError("the decoder loss (decoder_loss_weight > 0) needs `crops` and "
                       "`decode_soft`")
    b, length = targets.shape
    n = length // layout.length
    objs = jnp.reshape(jnp.asarray(targets), (b, n, layout.length))[:, :, layout.mask_slots]
    mask_targets = jnp.sum(objs != detection.IGNORE, axis=(1, 2))
    num_obj = jnp.minimum(mask_targets // t, task.max_obj_decoderloss)
    d = min(n, task.max_obj_decoderloss)
    supervised = jnp.any(objs != detection.IGNORE, axis=2)
    # The supervised objects first, in sequence order: (B, d) object indices.
    chosen = jnp.argsort(jnp.where(supervised, 0, 1), axis=1, stable=True)[:, :d]
    used = jnp.arange(d)[None] < num_obj[:, None]
    code_logits = jnp.reshape(jnp.asarray(logits, jnp.float32),
                              (b, n, layout.length, -1))[:, :, layout.mask_slots,
                                                         vocab.mask_codes]
    code_logits = jnp.take_along_axis(code_logits, chosen[:, :, None, None], axis=1)
    soft = decode_soft(jnp.reshape(code_logits, (b * d, t, vocab.num_mask_codes)))
    soft = jnp.reshape(soft, (b, d) + soft.shape[-2:])
    gt = jnp.take_along_axis(jnp.asarray(crops, jnp.float32),
                             chosen[:, :, None, None], axis=1)
    dice, mse = _dice_and_mse(soft, gt)
    count = jnp.maximum(num_obj, 1)
    per_image = (task.dice_loss_weight * jnp.sum(jnp.where(used, dice, 0.0), axis=1) / count
                 + jnp.sum(jnp.where(used, mse, 0.0), axis=1) / count)
    per_image = jnp.where(num_obj > 0, per_image, 0.0)
    total = total + jnp.sum(per_image * task.decoder_loss_weight * mask_targets
                            * task.mask_weight)
    aux = jnp.sum(per_image) / jnp.maximum(jnp.sum(num_obj > 0), 1)
  out["loss"] = total * task.loss_weight
  out["decoder_aux_ce"] = aux
  return out


# --- post-processing ---------------------------------------------------------------

def instances(task: InsSegTask, tokens, scores, mask_pred, ori_hw, scale_factor=None, *,
              window: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(bboxes (N, 5), labels (N,), masks (N, H_ori, W_ori) bool) of one image.

  `mask_pred` (>= N, S, S) are the objects' decoded masks: the VQ-VAE's
  `decode_soft` of the predicted mask-code logits (soft inference) or `decode` of the
  mask codes `detection.parse_objects(tokens, task.layout)[2]`. As in the reference,
  masks are pasted on the original image size `ori_hw` whether or not the boxes are
  rescaled to it (`scale_factor`); `window` as in `masks.paste_masks`.
  """
  bboxes, labels = detection.detections(task, tokens, scores, scale_factor)
  h, w = int(ori_hw[0]), int(ori_hw[1])
  masks = masks_lib.paste_masks(np.asarray(mask_pred)[:len(bboxes)], bboxes[:, :4], h, w,
                                window=window)
  return bboxes, labels, masks
