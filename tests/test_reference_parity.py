"""Parity with the reference PyTorch implementation, driven by the fixture directory.

Every `*_config.json` in `AIT_FIXTURES` (default ../shared/fixtures) is one test,
dispatched on its `fixture_kind`; the module is built from the fixture's own config and
loaded with its stored weights through the weight mapping, and every stored output is
compared. Run with `-s` to see the largest difference of each array.
"""

import dataclasses
import functools
import json
import math
import os
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ait_jax import convert
from ait_jax.checkpoint import mapping, pretrained, torch_files
from ait_jax.checkpoint.ait import ait_entries, ait_from_reference_config
from ait_jax.checkpoint.swin_v2 import swin_v2_entries, swin_v2_from_reference_kwargs
from ait_jax.checkpoint.transformer import (SINE_TABLE_ATOL, transformer_entries,
                                            transformer_from_reference_kwargs)
from ait_jax.checkpoint.vqvae import vqvae_entries, vqvae_from_reference_kwargs
from ait_jax.evaluation import depth_metrics
from ait_jax.models import decoding
from ait_jax.models import swin_v2_tables
from ait_jax.models.ait import AiT
from ait_jax.models.swin_v2 import swin_v2_base, swin_v2_large
from ait_jax.models.transformer import DEPTH_TASK, DET_TASK
from ait_jax.models.vocab import Vocab
from ait_jax.models.vqvae import VQVAE
from ait_jax.tasks import boxes as boxes_lib
from ait_jax.tasks import depth as depth_task
from ait_jax.tasks import detection
from ait_jax.tasks import insseg
from ait_jax.tasks import masks as masks_lib
from ait_jax.train import optimizer as optimizer_lib
from ait_jax.train import trainer
from tests import convert_utils
from tests.fixture_io import REPO, Fixture, assert_close, fixtures_dir, kind_fixtures
from tests.test_torch_files import write_torch_zip

jax.config.update("jax_default_matmul_precision", "highest")

# The fixtures README's suggested bounds; the printed differences are far below them.
SWIN_ATOL = 5e-4
TRANSFORMER_ATOL = 1e-4
VQVAE_ATOL = 1e-4
LOSS_RTOL = 1e-5
METRIC_RTOL = 1e-5
SCORES_ATOL = 1e-5


# --- swin_v2 -------------------------------------------------------------------------

def _sown(intermediates, debug_key: str) -> np.ndarray:
  """The sown value for `debug.layers.1.blocks.0.out` at `layers_1/blocks_0/out`."""
  path = re.sub(r"(layers|blocks)\.(\d+)", r"\1_\2", debug_key[len("debug."):])
  node = intermediates
  for name in path.split("."):
    node = node[name]
  (value,) = node
  return np.asarray(value)


def _as_reference_layout(got: np.ndarray, want: np.ndarray) -> np.ndarray:
  """Our NHWC maps in the fixture's layout: NCHW maps or (B, H*W, C) tokens."""
  if got.ndim == 4 and want.ndim == 4:
    return got.transpose(0, 3, 1, 2)
  return got.reshape(want.shape)


def _assert_exports_back(state_dict: dict, variables, entries, atol: dict | None = None):
  """Export gives the reference file back: its keys in order, dtypes and values (derived
  buffers recomputed, within their own tolerance)."""
  back = mapping.to_torch(variables, entries)
  assert list(back) == list(state_dict), "state_dict key order"
  for key, want in state_dict.items():
    assert back[key].dtype == want.dtype, f"{key}: {back[key].dtype} != {want.dtype}"
    np.testing.assert_allclose(back[key], want, rtol=0, atol=(atol or {}).get(key, 0),
                               err_msg=key)


def check_swin_v2(fx: Fixture):
  model = swin_v2_from_reference_kwargs(fx.config["kwargs"])
  entries = swin_v2_entries(model)
  variables = mapping.to_flax(fx.state_dict, entries, source=fx.name)
  _assert_exports_back(fx.state_dict, variables, entries,
                       {e.torch_key: e.atol for e in entries if isinstance(e, mapping.Buffer)})
  io = fx.io
  images = io["input"].transpose(0, 2, 3, 1)
  outs, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(
      variables, images)
  out_keys = sorted((k for k in io if re.fullmatch(r"out\d+", k)), key=lambda k: int(k[3:]))
  assert len(out_keys) == len(outs), f"{fx.name}: {out_keys} vs {len(outs)} outputs"
  for key, got in zip(out_keys, outs):
    assert_close(key, np.asarray(got).transpose(0, 3, 1, 2), io[key], atol=SWIN_ATOL)
  debug_keys = [k for k in io if k.startswith("debug.")]
  unchecked = set(io) - {"input", *out_keys, *debug_keys}
  assert not unchecked, f"{fx.name}: outputs without a check: {sorted(unchecked)}"
  for key in debug_keys:
    want = io[key]
    assert_close(key, _as_reference_layout(_sown(state["intermediates"], key), want),
                 want, atol=SWIN_ATOL)


# --- vqvae, vqvae_train --------------------------------------------------------------

def _load_vqvae(fx: Fixture, kind: str):
  module = vqvae_from_reference_kwargs(fx.config["kwargs"], kind)
  entries = vqvae_entries(module)
  variables = mapping.to_flax(fx.state_dict, entries, source=fx.name)
  _assert_exports_back(fx.state_dict, variables, entries)
  return module, entries, variables


def _codes_last(logits_nkhw: np.ndarray) -> np.ndarray:
  """Reference (B, K, h, w) code logits -> (B, h*w, K), row-major."""
  b, k = logits_nkhw.shape[:2]
  return logits_nkhw.reshape(b, k, -1).transpose(0, 2, 1)


def check_vqvae(fx: Fixture):
  module, _, variables = _load_vqvae(fx, "ait")
  io = fx.io
  apply = jax.jit(module.apply, static_argnames="method")
  tokens = apply(variables, io["input"], method=VQVAE.encode)
  assert_close("encode.tokens", tokens, io["encode.tokens"].astype(np.int32))
  for name, tok in (("decode.from_encode", io["encode.tokens"]),
                    ("decode.from_random_tokens", io["decode.random_tokens"])):
    assert_close(name, apply(variables, tok, method=VQVAE.decode), io[name],
                 atol=VQVAE_ATOL)
  logits = _codes_last(io["decode_soft.logits"])
  assert_close("decode_soft.out", apply(variables, logits, method=VQVAE.decode_soft),
               io["decode_soft.out"], atol=VQVAE_ATOL)
  out = apply(variables, io["input"])
  for name in ("total_loss", "recon_loss", "vq_loss"):
    assert_close(f"forward.{name}", getattr(out, name), io[f"forward.{name}"],
                 rtol=LOSS_RTOL)
  assert_close("forward.out", out.out[:, None], io["forward.out"], atol=VQVAE_ATOL)
  assert_close("forward.tokens", out.tokens, io["encode.tokens"].astype(np.int32))


def check_vqvae_train(fx: Fixture):
  module, entries, variables = _load_vqvae(fx, "train")
  io = fx.io
  x, label = io["img_masked"][:, 0], io["label_img"][:, 0]
  apply = jax.jit(module.apply, static_argnames=("train", "mutable"))
  out = apply(variables, x, label, train=False)
  for name in ("total_loss", "recon_loss"):
    assert_close(f"eval.{name}", getattr(out, name), io[f"eval.{name}"], rtol=LOSS_RTOL)
  assert_close("eval.out", out.out[:, None], io["eval.out"], atol=VQVAE_ATOL)
  codes = io["eval.code_indices"]
  assert_close("eval.code_indices", out.tokens.reshape(codes.shape),
               codes.astype(np.int32))
  out, updated = apply(variables, x, label, train=True, mutable=("vq",))
  for name in ("total_loss", "recon_loss"):
    assert_close(f"train.{name}", getattr(out, name), io[f"train.{name}"], rtol=LOSS_RTOL)
  assert_close("train.out", out.out[:, None], io["train.out"], atol=VQVAE_ATOL)
  assert set(updated) == {"vq"}, "a training forward changes only the codebook"
  after = mapping.to_torch({**variables, **updated}, entries)
  for key in ("_vq_vae._embedding", "_vq_vae._ema_cluster_size", "_vq_vae._ema_w"):
    assert_close(f"train.after_step.{key}", after[key], io[f"train.after_step.{key}"],
                 atol=VQVAE_ATOL)


# --- ar_transformer ------------------------------------------------------------------

def _variant(fx: Fixture, name: str) -> dict:
  """Constructor keywords of a variant: the main kwargs with the variant's overrides;
  `variants` keys read 'NAME (what it produced)'."""
  overrides = [v for k, v in fx.config["variants"].items() if k.split()[0] == name]
  assert len(overrides) == 1, f"{fx.config_path}: no single variant named {name!r}"
  return {**fx.config["kwargs"], **overrides[0]}


def _load_transformer(kwargs: dict, state_dict: dict):
  model = transformer_from_reference_kwargs(kwargs)
  entries = transformer_entries(model)
  variables = mapping.to_flax(state_dict, entries, source="ar_transformer state_dict")
  # Export gives the reference file back: same keys and order, the same values (the
  # sine table recomputed).
  exported = mapping.to_torch(variables, entries)
  assert list(exported) == list(state_dict)
  for k, v in state_dict.items():
    atol = SINE_TABLE_ATOL if k == "enc_embed" and model.pos_enc != "learned" else 0
    np.testing.assert_allclose(exported[k], v, rtol=0, atol=atol, err_msg=k)
  return model, jax.tree.map(jnp.asarray, variables)


def check_ar_transformer(fx: Fixture):
  io, cfg = fx.io, fx.config
  src = jnp.asarray(io["src"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
  main, main_vars = _load_transformer(_variant(fx, "main"), fx.state_dict)
  parallel_sd = {**fx.extra_state_dict("parallel_extra"), **fx.state_dict}
  parallel, parallel_vars = _load_transformer(_variant(fx, "parallel"), parallel_sd)

  for task in ("depth", "det", "mixed"):
    logits = main.apply(main_vars, src, jnp.asarray(io[f"train.{task}.input_seq"]),
                        jnp.asarray(io[f"train.{task}.task_id"]), train=True,
                        rngs={"dropout": jax.random.key(0)})
    assert_close(f"train.{task}.logits", logits, io[f"train.{task}.logits"],
                 atol=TRANSFORMER_ATOL)
  logits = parallel.apply(parallel_vars, src, jnp.asarray(io["train.depth.input_seq"]),
                          jnp.asarray(io["train.depth.task_id"]))
  assert_close("train.parallel.depth.logits", logits, io["train.parallel.depth.logits"],
               atol=TRANSFORMER_ATOL)

  hard, _ = _load_transformer(_variant(fx, "hard"), fx.state_dict)
  for name, model, variables in (("soft", main, main_vars), ("hard", hard, main_vars),
                                 ("parallel", parallel, parallel_vars)):
    pred = model.apply(variables, src, pred_len=cfg["pred_len_depth"],
                       method=decoding.decode_depth)
    assert_close(f"infer.depth.{name}.pred_logits", pred.logits,
                 io[f"infer.depth.{name}.pred_logits"], atol=TRANSFORMER_ATOL)
    assert_close(f"infer.depth.{name}.pred_tokens", pred.tokens,
                 io[f"infer.depth.{name}.pred_tokens"])

  det, _ = _load_transformer(_variant(fx, "det"), fx.state_dict)
  obj_len = 5
  assert cfg["pred_len_det"] % obj_len == 0
  pred = det.apply(main_vars, src, task_id=DET_TASK,
                   num_objects=cfg["pred_len_det"] // obj_len,
                   method=decoding.decode_objects)
  assert_close("infer.det.pred_tokens", pred.tokens, io["infer.det.pred_tokens"])
  assert_close("infer.det.pred_scores", pred.scores, io["infer.det.pred_scores"],
               atol=SCORES_ATOL)


# --- vocab ---------------------------------------------------------------------------

VOCAB_RANGES = {"box_bins": "bins", "classes": "classes", "mask_codes": "mask_codes",
                "depth_codes": "depth_codes"}


def check_vocab(fx: Fixture):
  for name, ref in fx.config["configs"].items():
    t = ref["transformer"]
    vocab = Vocab.from_reference(t)
    for key, value in vocab.offsets().items():
      assert value == t[key], f"{name}: {key} {value} != reference {t[key]}"
    assert vocab.size == t["voc_embed_rows"], name
    ranges = ref["token_ranges_half_open"]
    for ref_name, ours in VOCAB_RANGES.items():
      s = getattr(vocab, ours)
      assert [s.start, s.stop] == ranges[ref_name], f"{name}: {ref_name}"
    assert [vocab.noise_label, vocab.noise_label + 1] == ranges["noise_label"], name
    assert [vocab.enddepth_offset, vocab.size] == ranges.get(
        "unused_tail", [vocab.size, vocab.size]), name
    if "depth_head" in ref:
      assert ref["depth_head"]["depth_token_offset"] == vocab.depth_offset, name
    if "insseg_head" in ref:
      head = ref["insseg_head"]
      weights = insseg.token_class_weights(
          vocab, box_weight=head["box_weight"], cls_weight=head["cls_weight"],
          mask_weight=head["mask_weight"])
      want = np.ones_like(weights)
      for start, stop, w in head["loss_seq_class_weight_runs"]:
        want[start:stop] = w
      assert_close(f"{name}.insseg_head.loss_seq.weight", weights, want)
      assert head["mask_offset"] == vocab.mask_offset, name


# --- det_head, insseg_head -----------------------------------------------------------

# Pixels whose paste probability is this close to 0.5 may threshold either way.
PASTE_MARGIN = 1e-4
UNCHECKED = {"debug.test.transformer_mask"}


class _Checked(dict):
  """The io arrays, remembering which were read."""

  def __init__(self, io):
    super().__init__(io)
    self.read = set()

  def __getitem__(self, key):
    self.read.add(key)
    return super().__getitem__(key)

  def assert_all_read(self, name):
    left = set(self) - self.read - UNCHECKED
    assert not left, f"{name}: arrays without a check: {sorted(left)}"


def _vocab(cfg: dict) -> Vocab:
  """The fixture's vocabulary (depth codes play no part in these heads)."""
  v = cfg["vocab"]
  vocab = Vocab(num_bins=v["num_bins"], num_classes=v["num_classes"],
                num_mask_codes=v.get("num_embeddings", 0), num_depth_codes=0,
                size=v["num_vocal"])
  for key in ("class_offset", "special_offset", "noise_label", "mask_offset"):
    if key in v:
      assert getattr(vocab, key) == v[key], key
  return vocab


def _gt(io, b: int):
  boxes = [io[f"gt.img{i}.bboxes"] for i in range(b)]
  labels = [io[f"gt.img{i}.labels"] for i in range(b)]
  return boxes, labels


def _num_images(io) -> int:
  return len(io["gt.img_shapes"])


def _draws(io, prefix: str, b: int) -> detection.SequenceDraws:
  return detection.SequenceDraws(
      perms=tuple(io[f"{prefix}.perm.img{i}"] for i in range(b)),
      randint=io[f"{prefix}.corrupt.randint"], rand=io[f"{prefix}.corrupt.rand"])


def _check_loss(name, got: dict, io, keys):
  for k in keys:
    assert_close(f"{name}.{k}", got[k], io[f"{name}.{k}"], rtol=LOSS_RTOL)


def _in_given_order(task, boxes, labels, img_shapes) -> np.ndarray:
  """build_input_seq: each image's objects in the given order, zero-padded (mask
  slots 0)."""
  rows = [detection.object_rows(
      detection.order_objects(bx, hw, np.arange(len(bx)), num_query=task.num_query,
                              seq_aug=False, rng=None),
      lab, task.vocab, task.layout, task.norm_val)
          for bx, lab, hw in zip(boxes, labels, img_shapes[:, :2])]
  return detection.pad_objects(rows, max(len(x) for x in labels))


def _check_pred_len(task, cfg):
  called = cfg["test"]["transformer_called_with"]
  assert called["pred_len"] == task.num_query * task.layout.length


# --- det_head --------------------------------------------------------------------------

def check_det_head(fx: Fixture):
  cfg, io = fx.config, _Checked(fx.io)
  task = detection.DetTask.from_reference(cfg["kwargs"], _vocab(cfg))
  layout = task.layout
  b = _num_images(io)
  boxes, labels = _gt(io, b)
  counts = [len(x) for x in labels]

  built = _in_given_order(task, boxes, labels, io["gt.img_shapes"])
  assert_close("build_input_seq.out", built, io["build_input_seq.out"])
  for i in range(b):
    key = f"debug.build_input_seq.img{i}.scaled_boxes"
    assert_close(key, boxes_lib.to_bins(boxes[i], task.norm_val, task.vocab.num_bins),
                 io[key])
  assert_close("get_targets.out", detection.object_targets(built, counts, layout),
               io["get_targets.out"])

  seqs = detection.object_sequences(task, boxes, labels, io["gt.img_shapes"],
                                    draws=_draws(io, "get_seq", b))
  assert_close("get_seq.input_seq", seqs.input_seq, io["get_seq.input_seq"])
  assert_close("get_seq.target_seq", seqs.target_seq, io["get_seq.target_seq"])

  # Losses on a training-layout sequence (real objects, then noise objects).
  targets = detection.object_targets(io["loss.input_seq"], counts, layout)
  assert_close("loss.target_seq", targets, io["loss.target_seq"])
  loss2 = detection.sequence_loss(io["loss.out_seq"], targets, layout,
                                  loss_weight=task.loss_weight)
  _check_loss("loss2", loss2, io, ("loss", "cls_ce", "bbox_ce"))
  older = {"loss": detection.normalized_loss(loss2["loss"], loss2["num_targets"])[None],
           "cls_ce": loss2["cls_ce"], "bbox_ce": loss2["bbox_ce"]}
  _check_loss("loss", older, io, ("loss", "cls_ce", "bbox_ce"))
  got = detection.sequence_loss(io["loss2_get_seq_target.out_seq"], seqs.target_seq,
                                layout, loss_weight=task.loss_weight)
  _check_loss("loss2_get_seq_target", got, io, ("loss", "cls_ce", "bbox_ce"))

  _check_pred_len(task, cfg)
  metas = cfg["test"]["img_metas"]
  for rescale in (0, 1):
    for i, meta in enumerate(metas):
      pre = f"test.rescale{rescale}.img{i}"
      bboxes, classes = detection.detections(
          task, io[f"test.img{i}.pred_tokens"], io[f"test.img{i}.pred_scores"],
          meta["scale_factor"] if rescale else None)
      assert_close(f"{pre}.bboxes", bboxes, io[f"{pre}.bboxes"])
      assert_close(f"{pre}.labels", classes, io[f"{pre}.labels"])
      _check_per_class(pre, task.vocab.num_classes, classes, bboxes, io)
  io.assert_all_read(fx.name)


def _check_per_class(pre, num_classes, classes, bboxes, io):
  per_class = detection.split_by_class(classes, num_classes, bboxes)
  assert_close(f"{pre}.bbox_result.counts", np.array([len(x) for x in per_class]),
               io[f"{pre}.bbox_result.counts"])
  assert_close(f"{pre}.bbox_result.rows", np.concatenate(per_class),
               io[f"{pre}.bbox_result.rows"])


# --- insseg_head -----------------------------------------------------------------------

def _insseg_task(cfg: dict, vocab: Vocab, **over) -> insseg.InsSegTask:
  return insseg.InsSegTask.from_reference(
      {**cfg["kwargs"], **over, "vae_cfg": cfg["vae_cfg"]}, vocab)


def _load_head_vqvae(fx: Fixture):
  module = vqvae_from_reference_kwargs(fx.config["vae_cfg"], "ait")
  prefix = "vqvae."
  sd = {k[len(prefix):]: v for k, v in fx.state_dict.items() if k.startswith(prefix)}
  variables = mapping.to_flax(sd, vqvae_entries(module), source=fx.name)
  apply = jax.jit(module.apply, static_argnames="method")

  def run(method):
    return lambda x: apply(variables, x, method=method)

  return run(VQVAE.encode), run(VQVAE.decode), run(VQVAE.decode_soft)


def _assert_masks(name, got, want, prob):
  """Binary masks equal except where the paste probability is within the margin."""
  sure = np.abs(prob - 0.5) >= PASTE_MARGIN
  print(f"  {name}: {int(np.sum(~sure))} pixels within {PASTE_MARGIN} of 0.5 skipped")
  assert_close(name, np.where(sure, got, False), np.where(sure, want, False))


def check_insseg_head(fx: Fixture):
  cfg, io = fx.config, _Checked(fx.io)
  vocab = _vocab(cfg)
  task = _insseg_task(cfg, vocab)
  encode, decode, decode_soft = _load_head_vqvae(fx)
  assert_close("loss_seq.weight", task.class_weights, fx.state_dict["loss_seq.weight"])
  b = _num_images(io)
  boxes, labels = _gt(io, b)
  gt_masks = [io[f"gt.img{i}.masks"] for i in range(b)]
  counts = [len(x) for x in labels]
  s = task.mask_size

  crops = []
  for i in range(b):
    pre = f"crop.img{i}"
    aligned = masks_lib.roi_align(gt_masks[i], boxes[i], s)
    assert_close(f"{pre}.roi_align", aligned, io[f"{pre}.roi_align"])
    crops.append(masks_lib.crop_masks(gt_masks[i], boxes[i], s))
    assert_close(f"{pre}.mask", crops[i], io[f"{pre}.mask"])
    assert_close(f"{pre}.mask_tokens", encode(crops[i]) if counts[i] else
                 np.zeros((0, task.mask_token_length)), io[f"{pre}.mask_tokens"])

  # build_input_seq in both layouts: objects in the given order, zero-padded.
  n_max = max(counts)
  padded_crops = np.zeros((b, n_max, s, s), np.float32)
  has_mask = np.zeros((b, n_max), bool)
  for i in range(b):
    padded_crops[i, :counts[i]] = crops[i]
    has_mask[i, :counts[i]] = True
  for mbl in (0, 1):
    t = dataclasses.replace(task, mask_before_label=bool(mbl))
    seq = _in_given_order(t, boxes, labels, io["gt.img_shapes"])
    _, built = insseg.add_mask_codes(t, seq[:, :-1], seq, padded_crops, has_mask, encode)
    key = f"build_input_seq.mask_before_label{mbl}"
    assert_close(key, built, io[key])

  # get_seq with the stored draws.
  seqs = insseg.make_sequences(task, boxes, labels, gt_masks, io["gt.img_shapes"],
                               draws=_draws(io, "get_seq", b))
  inputs, targets = (np.asarray(x) for x in insseg.add_mask_codes(
      task, seqs.input_seq, seqs.target_seq, seqs.crops, seqs.has_mask, encode))
  assert_close("get_seq.input_seq", inputs, io["get_seq.input_seq"])
  # The reference ignores nothing here; we ignore the padding objects' box and mask
  # slots (see ait_jax/tasks/insseg.py), which it leaves 0.
  obj = np.arange(targets.shape[1]) // task.layout.length
  ignored = targets == detection.IGNORE
  assert not np.any(ignored & (obj[None] < np.array(counts)[:, None])), "real objects"
  assert_close("get_seq.target_seq", np.where(ignored, 0, targets),
               io["get_seq.target_seq"])
  assert_close("get_seq.head_mask_after", seqs.crops[-1, :counts[-1]],
               io["get_seq.head_mask_after"])

  # get_targets on training-layout sequences.
  num_real = io["get_targets.num_objects"]
  flags = [io[f"get_targets.bad_bbox_flag.img{i}"] for i in range(len(num_real))]
  for mbl in (0, 1):
    layout = detection.ObjectLayout(task.mask_token_length, bool(mbl))
    pre = f"get_targets.mask_before_label{mbl}"
    for mode in ("default", "sup_neg_mask", "no_sup_mask"):
      got = detection.object_targets(io[f"{pre}.input_seq"], num_real, layout,
                                     mask_supervision=mode, bad_flags=flags)
      assert_close(f"{pre}.{mode}", got, io[f"{pre}.{mode}"])

  for case, spec in cfg["loss_cases"].items():
    if isinstance(spec, dict):
      _check_insseg_loss(f"loss2.{case}", spec, cfg, io, vocab, gt_masks, encode,
                         decode_soft)

  _check_pred_len(task, cfg)
  for variant in ("soft", "hard"):
    for rescale in (0, 1):
      for i, meta in enumerate(cfg["test"]["img_metas"]):
        _check_insseg_test(task, f"test.{variant}.rescale{rescale}.img{i}", io, i, meta,
                           rescale, decode_soft if variant == "soft" else None, decode)

  box, mask = io["inverted_box.bbox"], io["inverted_box.mask_pred"]
  want = io["inverted_box.masks_skip_empty_false"]
  h, w = want.shape[1:]
  prob = masks_lib.paste_probabilities(mask, box, h, w, window=False)
  _assert_masks("inverted_box.masks_skip_empty_false",
                masks_lib.paste_masks(mask, box, h, w, window=False), want, prob)
  # The reference's CPU branch raises here; ours pastes nothing.
  assert not masks_lib.paste_masks(mask, box, h, w).any()
  io.assert_all_read(fx.name)


def _check_insseg_loss(pre, spec, cfg, io, vocab, gt_masks, encode, decode_soft):
  task = _insseg_task(cfg, vocab, **spec["over"], seq_aug=True)
  assert_close(f"{pre}.class_weight", task.class_weights, io[f"{pre}.class_weight"])
  images = io[f"{pre}.images"]
  assert list(images) == spec["images"]
  b = len(images)
  boxes, labels = _gt(io, _num_images(io))
  perms = tuple(io[f"{pre}.perm.img{j}"] for j in range(b))
  # Training layout: the noise objects' box and mask slots are ignored whatever they
  # hold, so any noise draws give the stored targets.
  draws = detection.SequenceDraws(perms, np.zeros((b, task.num_query), np.int64),
                                  np.zeros((b, task.num_query), np.float32))
  seqs = insseg.make_sequences(
      task, [boxes[i] for i in images], [labels[i] for i in images],
      [gt_masks[i] for i in images], io["gt.img_shapes"][images],
      rng=np.random.default_rng(0), draws=draws)
  _, targets = insseg.add_mask_codes(task, seqs.input_seq, seqs.target_seq, seqs.crops,
                                     seqs.has_mask, encode)
  assert_close(f"{pre}.target_seq", targets, io[f"{pre}.target_seq"])
  last = len(perms[-1])
  assert_close(f"{pre}.head_mask", seqs.crops[-1, :last], io[f"{pre}.head_mask"])

  logits = io[f"{pre}.out_seq"]
  got = jax.jit(lambda x, y, c: insseg.sequence_loss(task, x, y, c, decode_soft))(
      logits, targets, seqs.crops)
  _check_loss(pre, got, io, ("loss", "cls_ce", "bbox_ce", "mask_ce", "decoder_aux_ce"))
  num_obj = spec["num_obj_for_decoder_loss"]
  assert spec["decoder_loss_computed"] == (task.decoder_loss_weight > 0 and num_obj > 0)
  if spec["decoder_loss_computed"]:
    layout = task.layout
    objs = logits.reshape(b, -1, layout.length, logits.shape[-1])
    code_logits = objs[0, :num_obj, layout.mask_slots, vocab.mask_codes]
    assert_close(f"{pre}.debug.soft_mask", decode_soft(code_logits),
                 io[f"{pre}.debug.soft_mask"], atol=VQVAE_ATOL)


def _check_insseg_test(task, pre, io, i, meta, rescale, decode_soft, decode):
  tokens, scores = io[f"test.img{i}.pred_tokens"], io[f"test.img{i}.pred_scores"]
  n = len(tokens) // task.layout.length
  if decode_soft is not None:
    mask_pred = decode_soft(io[f"test.img{i}.pred_mask_logits"][:n])
  else:
    mask_pred = decode(detection.parse_objects(tokens, task.layout)[2])
  assert_close(f"{pre}.debug.mask_pred", mask_pred, io[f"{pre}.debug.mask_pred"],
               atol=VQVAE_ATOL)
  ori_hw = meta["ori_shape"][:2]
  bboxes, classes, masks = insseg.instances(task, tokens, scores, mask_pred, ori_hw,
                                            meta["scale_factor"] if rescale else None)
  assert_close(f"{pre}.bboxes", bboxes, io[f"{pre}.bboxes"])
  assert_close(f"{pre}.labels", classes, io[f"{pre}.labels"])
  prob = io[f"{pre}.debug.paste_prob_whole_image"]
  whole_prob = masks_lib.paste_probabilities(mask_pred, bboxes[:, :4], *ori_hw,
                                             window=False)
  assert_close(f"{pre}.debug.paste_prob_whole_image", whole_prob, prob, atol=VQVAE_ATOL)
  _assert_masks(f"{pre}.masks", masks, io[f"{pre}.masks"], prob)
  _, _, whole = insseg.instances(task, tokens, scores, mask_pred, ori_hw,
                                 meta["scale_factor"] if rescale else None, window=False)
  _assert_masks(f"{pre}.masks_skip_empty_false", whole, io[f"{pre}.masks_skip_empty_false"],
                prob)
  if rescale:
    _check_per_class(pre, task.vocab.num_classes, classes, bboxes, io)
    per_class = detection.split_by_class(classes, task.vocab.num_classes, masks)
    _assert_masks(f"{pre}.mask_result.masks", np.concatenate(per_class),
                  io[f"{pre}.mask_result.masks"],
                  np.concatenate(detection.split_by_class(classes, task.vocab.num_classes,
                                                          prob)))


# --- ait_depth_e2e -------------------------------------------------------------------

# The multi-task loss dict's entries for tasks other than depth: the reference's zero
# placeholders, which a depth-only batch leaves untouched.
OTHER_TASK_LOSSES = ("det_loss", "det_cls_ce", "det_bbox_ce", "insseg_loss",
                     "insseg_cls_ce", "insseg_bbox_ce", "insseg_mask_ce",
                     "insseg_decoder_aux_ce")


def check_ait_depth_e2e(fx: Fixture):
  io, model_cfg = fx.io, fx.config["model"]
  ref = ait_from_reference_config(model_cfg)
  variables = mapping.to_flax(fx.state_dict, ait_entries(ref), source=fx.name)
  model, tokenizer = ref.model, ref.tokenizers["depth"]
  model_vars = jax.tree.map(jnp.asarray, variables["model"])
  tok_vars = jax.tree.map(jnp.asarray, variables["tokenizers"]["depth"])
  head = ref.task_heads["depth"]
  vocab = model.transformer.vocab
  assert head["depth_token_offset"] == vocab.depth_offset
  assert head["task_id"] == DEPTH_TASK
  fit = dict(resizeto=model_cfg.get("resizeto", 0), padto=model_cfg.get("padto", 0))

  # forward_train([img], gt=[{'depth': depth}], task=['depth'])
  images = depth_task.resize_and_pad(jnp.asarray(io["train.img"].transpose(0, 2, 3, 1)),
                                     **fit)
  depth = jnp.asarray(io["train.depth"][:, 0])
  target_seq = jax.jit(depth_task.depth_targets, static_argnums=(0, 3))(
      tokenizer, tok_vars, depth, vocab)
  input_seq = target_seq[:, :-1]
  assert_close("train.input_seq", input_seq, io["train.input_seq"])
  assert_close("train.target_seq", target_seq, io["train.target_seq"])
  feats = jax.jit(lambda v, x: model.apply(v, x, method=AiT.features))(model_vars, images)
  assert_close("train.backbone_out", np.asarray(feats).transpose(0, 3, 1, 2),
               io["train.backbone_out"], atol=SWIN_ATOL)
  task_id = jnp.full((images.shape[0],), DEPTH_TASK, jnp.int32)
  logits = jax.jit(lambda v, x, s, t: model.apply(
      v, x, s, t, train=True, rngs={"dropout": jax.random.key(0)}))(
          model_vars, images, input_seq, task_id)
  assert_close("train.transformer_logits", logits, io["train.transformer_logits"],
               atol=TRANSFORMER_ATOL)

  loss_fn = jax.jit(lambda lg, t, d, v: depth_task.depth_loss(
      lg, t, d, tokenizer, v, vocab, loss_weight=head.get("loss_weight", 1.0),
      decoder_loss_weight=head.get("decoder_loss_weight", 0.0)))
  loss, metrics = loss_fn(logits, target_seq, depth, tok_vars)
  losses = {"depth_loss": loss, **metrics}
  stored = {k[len("train.losses."):] for k in io if k.startswith("train.losses.")}
  assert stored == set(losses) | set(OTHER_TASK_LOSSES), sorted(stored)
  for name in OTHER_TASK_LOSSES:
    assert float(io[f"train.losses.{name}"]) == 0.0, name
  for name, value in losses.items():
    assert_close(f"train.losses.{name}", value, io[f"train.losses.{name}"],
                 rtol=LOSS_RTOL)

  # forward_test(img, task='depth', depth=depth)
  test_images = jnp.asarray(io["test.img"].transpose(0, 2, 3, 1))
  _, h, w, _ = test_images.shape
  # DepthHead's defaults for the keys a config leaves out.
  windows_cfg = dict(shift_window_test=head.get("shift_window_test", True),
                     shift_size=head.get("shift_size", 2),
                     flip_test=head.get("flip_test", True))
  starts = depth_task.window_starts(
      h, w, shift_window_test=windows_cfg["shift_window_test"],
      shift_size=windows_cfg["shift_size"])
  if "window_interval" in fx.config["test"] and len(starts) > 1:
    assert starts[1] == fx.config["test"]["window_interval"]
  windows = depth_task.resize_and_pad(depth_task.window_images(
      test_images, starts, flip_test=windows_cfg["flip_test"]), **fit)
  token_length = tokenizer.token_length
  pred = jax.jit(lambda v, x: model.apply(v, x, token_length, method=AiT.decode_depth))(
      model_vars, windows)
  assert_close("test.windows_pred_logits", pred.logits, io["test.windows_pred_logits"],
               atol=TRANSFORMER_ATOL)
  assert_close("test.windows_pred_tokens", pred.tokens, io["test.windows_pred_tokens"])
  predict = jax.jit(lambda mv, tv, x: depth_task.predict_depth(
      model, mv, tokenizer, tv, x, token_length=token_length,
      soft=head.get("soft_vae", False), **windows_cfg, **fit))
  assert_close("test.pred", predict(model_vars, tok_vars, test_images), io["test.pred"],
               atol=VQVAE_ATOL)
  checked = {"train.img", "train.depth", "test.img", "test.depth", "train.input_seq",
             "train.target_seq", "train.backbone_out", "train.transformer_logits",
             "test.windows_pred_logits", "test.windows_pred_tokens", "test.pred"}
  unchecked = set(io) - checked - {f"train.losses.{k}" for k in stored}
  assert not unchecked, f"{fx.name}: outputs without a check: {sorted(unchecked)}"


# --- depth_metrics -------------------------------------------------------------------


def check_depth_metrics(fx: Fixture):
  io = fx.io
  acc = depth_metrics.DepthMetricsAccumulator()
  for i in range(fx.config["n_samples"]):
    s = f"s{i}"
    pred, gt = io[f"{s}.pred"], io[f"{s}.gt"]
    assert depth_metrics.eval_pixels(pred, gt)[0].size == io[f"{s}.n_valid_after_crop"]
    got = acc.add(pred, gt)
    for k in depth_metrics.METRIC_NAMES:
      assert_close(f"{s}.eval_depth.{k}", got[k], io[f"{s}.eval_depth.{k}"],
                   rtol=METRIC_RTOL)
    # The SiLog losses see the prediction after cropping_img's in-place replacement.
    pred = np.where(np.isinf(pred), depth_metrics.MAX_DEPTH, pred)
    pred = np.where(np.isnan(pred), depth_metrics.MIN_DEPTH, pred)
    assert_close(f"{s}.siloss_metrics", depth_task.silog_loss(pred, gt, min_pred=None),
                 io[f"{s}.siloss_metrics"], rtol=METRIC_RTOL)
    assert_close(f"{s}.siloss_depth_head", depth_task.silog_loss(pred, gt),
                 io[f"{s}.siloss_depth_head"], rtol=METRIC_RTOL)
  mean = acc.result()
  for k in depth_metrics.METRIC_NAMES:
    assert_close(f"mean.eval_depth.{k}", mean[k], io[f"mean.eval_depth.{k}"],
                 rtol=METRIC_RTOL)


CHECKS = {
    "swin_v2": check_swin_v2,
    "ar_transformer": check_ar_transformer,
    "vocab": check_vocab,
    "det_head": check_det_head,
    "insseg_head": check_insseg_head,
    "vqvae": check_vqvae,
    "vqvae_train": check_vqvae_train,
    "depth_metrics": check_depth_metrics,
    "ait_depth_e2e": check_ait_depth_e2e,
}


@pytest.mark.parametrize("fx", kind_fixtures(), ids=lambda fx: f"{fx.kind}:{fx.name}")
def test_fixture(fx: Fixture):
  assert fx.kind in CHECKS, f"{fx.config_path}: unknown fixture_kind {fx.kind!r}"
  CHECKS[fx.kind](fx)


# --- manifests: the state_dict layout of the full-size reference models ----------------

def _manifests() -> list:
  return sorted(fixtures_dir().glob("manifest_*.json"))


def _abstract_variables(module, *args, **kwargs):
  boxed = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a, **kwargs), *args)
  return nn.meta.unbox(boxed)


def _num_params(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _reference_modules(manifest: dict):
  """(entries, {name: abstract variables}, trainable count) of a manifest's model."""
  if "model_cfg" in manifest:
    ref = ait_from_reference_config(manifest["model_cfg"])
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    seq = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    task = jax.ShapeDtypeStruct((1,), jnp.int32)
    trees = {"model": _abstract_variables(ref.model, images, seq, task)}
    for task, tok in ref.tokenizers.items():
      maps = jax.ShapeDtypeStruct((1, tok.mask_size, tok.mask_size), jnp.float32)
      trees[task] = _abstract_variables(tok, maps)
    return ait_entries(ref), trees, _num_params(trees["model"]["params"])
  tok = vqvae_from_reference_kwargs(manifest["kwargs"], "ait")
  maps = jax.ShapeDtypeStruct((1, tok.mask_size, tok.mask_size), jnp.float32)
  return vqvae_entries(tok), {"tokenizer": _abstract_variables(tok, maps)}, 0


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: p.stem)
def test_manifest(path):
  """Full-size models: parameter counts, and a state_dict of the manifest's keys and shapes
  goes to Flax and back unchanged (params zero, derived buffers as the config gives)."""
  manifest = json.loads(path.read_text())
  entries, trees, trainable = _reference_modules(manifest)
  assert trainable == manifest["num_trainable_parameters"]
  assert sum(_num_params(t["params"]) for t in trees.values()) == \
      manifest["num_parameters_unique"]
  layout = {k: tuple(v["shape"]) for k, v in manifest["state_dict"].items()}
  assert [e.torch_key for e in entries] == list(layout), "key order"
  for name, tree in trees.items():
    root = () if "model_cfg" not in manifest else (("model",) if name == "model"
                                                   else ("tokenizers", name))
    scoped = [dataclasses.replace(e, flax_path=e.flax_path[len(root):]) for e in entries
              if isinstance(e, mapping.Param) and e.flax_path[:len(root)] == root]
    mapping.check_covers(scoped, tree, collections=("params", "vq"))

  derived = {e.torch_key: np.asarray(e.value) for e in entries
             if isinstance(e, mapping.Buffer)}
  zeros = {k: derived.get(k, np.zeros(shape, np.float32)) for k, shape in layout.items()}
  back = mapping.to_torch(mapping.to_flax(zeros, entries, source=path.name), entries)
  assert {k: v.shape for k, v in back.items()} == layout
  assert list(back) == list(layout)
  assert all(not np.any(back[k]) for k in layout if k not in derived)

  # Derived buffers are checked, not trusted: zeros in their place are reported.
  nonzero = sorted(k for k, v in derived.items() if np.any(v))
  if not nonzero:
    return
  with pytest.raises(mapping.StateDictMismatch) as err:
    mapping.to_flax({**zeros, **{k: np.zeros_like(derived[k]) for k in nonzero}}, entries)
  assert sorted(k for k, _ in err.value.value) == nonzero


@pytest.mark.parametrize("name, preset", [
    ("swinv2b_480reso_depthonly", swin_v2_base()),
    ("swinv2b_480reso_parallel_depthonly", swin_v2_base()),
    ("swinv2b_640reso_joint", swin_v2_base(shifts=(True,) * 4, drop_path_rate=0.3)),
    ("swinv2b_640reso_detonly", swin_v2_base(shifts=(True,) * 4, drop_path_rate=0.3)),
    ("swinv2l_480reso_depthonly", swin_v2_large()),
])
def test_swin_presets_equal_the_reference_configs(name, preset):
  path = fixtures_dir() / f"manifest_{name}.json"
  if not path.exists():
    pytest.skip(f"{path} is not in this fixture directory")
  manifest = json.loads(path.read_text())
  assert swin_v2_from_reference_kwargs(manifest["model_cfg"]["backbone"]) == preset


# --- layer_decay.json: the optimizer's per-parameter lr scale and weight decay ----------

def _optimizer_config(opt: dict) -> ml_collections.ConfigDict:
  paramwise = opt["paramwise_cfg"]
  return ml_collections.ConfigDict(dict(optimizer=dict(
      layer_decay_depths=tuple(paramwise["num_layers"]),
      layer_decay_rate=paramwise["layer_decay_rate"],
      no_decay_names=tuple(paramwise.get("no_decay_names", ())))))


def check_layer_decay(path) -> int:
  """Compares every config of a layer_decay.json; returns the parameters checked."""
  fixture = json.loads(open(path).read())
  checked = 0
  for name, entry in fixture.items():
    manifest = json.loads((fixtures_dir() / f"manifest_{name}.json").read_text())
    ref = ait_from_reference_config(manifest["model_cfg"])
    boxed = jax.eval_shape(lambda: ref.model.init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 1), jnp.int32),
        jnp.zeros((1,), jnp.int32)))
    params = nn.meta.unbox(boxed)["params"]
    ours = optimizer_lib.summarize(params, _optimizer_config(entry["optimizer"]))
    by_key = {e.torch_key: e.flax_path for e in ait_entries(ref)
              if isinstance(e, mapping.Param)}
    base_wd = entry["optimizer"]["weight_decay"]
    seen = set()
    problems = []
    for torch_key, want in entry["params"].items():
      flax_path = by_key[torch_key]
      assert flax_path[:2] == ("model", "params"), (name, torch_key, flax_path)
      key = "/".join(flax_path[2:])
      scale, decays = ours[key]
      seen.add(key)
      if not math.isclose(scale, want["lr_scale"], rel_tol=1e-12):
        problems.append(f"{torch_key} ({key}): lr_scale {scale} != {want['lr_scale']}")
      if decays != (want["weight_decay"] == base_wd and base_wd > 0):
        problems.append(f"{torch_key} ({key}): weight decay {decays}, reference "
                        f"{want['weight_decay']}")
      checked += 1
    missing = sorted(set(ours) - seen)
    assert not missing, f"{name}: trainable leaves the fixture does not name: {missing}"
    assert not problems, f"{name}:\n" + "\n".join(problems)
    assert sum(layers + 1 for layers in entry["optimizer"]["paramwise_cfg"]["num_layers"]
               ) + 1 == entry["num_layers_after_constructor"]
  return checked


def test_layer_decay():
  path = fixtures_dir() / "layer_decay.json"
  if not path.exists():
    pytest.skip(f"{path} is not in this fixture directory")
  assert check_layer_decay(path) > 0

# --- conversion: the fixtures' weights and the full-size layouts through reference files
#
# Reference files (torch zip, safetensors) -> orbax -> reference files, bit for bit.
# Tests that need torch import it lazily and skip that leg without it.

def _fixture_parts(fx: Fixture):
  """(entries, state_dict) of a fixture's module, or None for kinds without weights."""
  if fx.kind == "swin_v2":
    return swin_v2_entries(swin_v2_from_reference_kwargs(fx.config["kwargs"])), fx.state_dict
  if fx.kind in ("vqvae", "vqvae_train"):
    module = vqvae_from_reference_kwargs(fx.config["kwargs"],
                                         "ait" if fx.kind == "vqvae" else "train")
    return vqvae_entries(module), fx.state_dict
  if fx.kind == "ar_transformer":
    kwargs = {**fx.config["kwargs"], "parallel": True, "soft_transformer": False}
    sd = {**fx.state_dict, **fx.extra_state_dict("parallel_extra")}
    return transformer_entries(transformer_from_reference_kwargs(kwargs)), sd
  return None


def _torch_file_writers():
  writers = {"zip_without_torch": lambda p, sd: write_torch_zip(p, {"state_dict": sd})}
  if torch_files.torch_available():
    writers["torch.save"] = torch_files.write_torch
  return writers


@pytest.mark.parametrize("writer", sorted(_torch_file_writers()))
def test_fixture_weights_round_trip(writer, tmp_path):
  """Every fixture module's weights: PyTorch file -> orbax -> PyTorch file, unchanged."""
  write = _torch_file_writers()[writer]
  checked = 0
  for fx in kind_fixtures():
    parts = _fixture_parts(fx)
    if parts is None:
      continue
    entries, sd = parts
    src = str(tmp_path / f"{fx.name}.pth")
    write(src, sd)
    part = pretrained.import_part(torch_files.read_state_dict(src), "m",
                                  pretrained.Target(entries, {"m": entries}))
    assert part.complete and not part.ignored, part.problems()
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / f"{fx.name}_orbax", mapping.unflatten(part.loaded))
    ckpt.wait_until_finished()
    restored = jax.device_get(ckpt.restore(tmp_path / f"{fx.name}_orbax"))
    written = torch_files.write_state_dict(str(tmp_path / f"{fx.name}_out"),
                                           mapping.to_torch(restored, entries))
    for path in written:
      convert_utils.assert_state_dicts_equal(torch_files.read_state_dict(path).state_dict, sd, entries)
    checked += 1
  assert checked >= 4


def _e2e_config(fx: Fixture):
  model = fx.config["model"]
  size = model["task_heads"]["depth"]["vae_cfg"]["mask_size"]
  return convert_utils.load_config(convert_utils.DEMO, model=model, crop_size=(size, size))


def _e2e_fixture() -> Fixture:
  found = [fx for fx in kind_fixtures() if fx.kind == "ait_depth_e2e"]
  if not found:
    pytest.skip("no ait_depth_e2e fixture")
  return found[0]


def test_reference_ait_checkpoint_through_a_workdir(tmp_path):
  """A full AiT checkpoint (mmcv layout) -> workdir -> the same state_dict back, which
  (with torch) a torch module of the reference's keys loads strictly."""
  fx = _e2e_fixture()
  cfg = _e2e_config(fx)
  src = str(tmp_path / "ait.pth")
  write_torch_zip(src, {"meta": {"iter": 100}, "state_dict": {
      f"module.{k}": v for k, v in fx.state_dict.items()}})
  combined = convert.from_torch(cfg, [src], str(tmp_path / "wd"))
  assert not combined.not_loaded and combined.parts[0].role == "ait"
  with open(tmp_path / "wd" / convert.REPORT_FILE) as f:
    notes = json.load(f)["files"][0]["notes"]
  assert notes[0] == "took the state_dict from the 'state_dict' entry (not read: meta)"
  written = convert.to_torch(cfg, str(tmp_path / "wd"), str(tmp_path / "out"))
  entries = convert.target_of(cfg).entries
  for path in written:
    convert_utils.assert_state_dicts_equal(torch_files.read_state_dict(path).state_dict, fx.state_dict,
                              entries)
  if not torch_files.torch_available():
    return
  import torch  # pylint: disable=g-import-not-at-top
  module = convert_utils.module_tree({k: (v.shape, v.dtype) for k, v in fx.state_dict.items()}, torch)
  module.load_state_dict(torch.load(written[1], weights_only=True), strict=True)
  for k, v in module.state_dict().items():
    np.testing.assert_allclose(v.numpy(), fx.state_dict[k], rtol=0,
                               atol=1e-6 if k.endswith("enc_embed") else 0, err_msg=k)


def _swin_fixture() -> Fixture:
  found = [fx for fx in kind_fixtures() if fx.kind == "swin_v2"]
  if not found:
    pytest.skip("no swin_v2 fixture")
  return found[0]


def _simmim_file(path, sd: dict) -> None:
  """A SimMIM pretraining checkpoint around a backbone state_dict (norm0-3 -> norm)."""
  encoder = {f"encoder.{k}": v for k, v in sd.items() if not k.startswith("norm")}
  last = max(int(k[4]) for k in sd if k.startswith("norm"))
  encoder["encoder.norm.weight"] = sd[f"norm{last}.weight"]
  encoder["encoder.norm.bias"] = sd[f"norm{last}.bias"]
  encoder["encoder.mask_token"] = np.zeros((1, 1, sd["patch_embed.proj.bias"].shape[0]),
                                           np.float32)
  encoder["decoder.0.weight"] = np.ones((48, 8, 1, 1), np.float32)
  write_torch_zip(path, {"model": encoder, "epoch": 800})


def _ait_with_backbone(backbone: dict) -> pretrained.Target:
  width = backbone["embed_dim"] * 2 ** (len(backbone["depths"]) - 1)
  ref = ait_from_reference_config(dict(
      type="AiT", backbone={**backbone, "out_indices": (len(backbone["depths"]) - 1,)},
      transformer=dict(type="ARTransformer", in_chans=width, d_model=16, nhead=2,
                       num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
                       num_vocal=40, num_bins=10, num_classes=3, num_embeddings=8,
                       num_embeddings_depth=8, dec_length=10, n_rows=2, n_cols=2)))
  return pretrained.ait_target(ref)


def test_simmim_backbone_at_other_window_sizes(tmp_path):
  fx = _swin_fixture()
  kwargs = fx.config["kwargs"]
  src = str(tmp_path / "simmim.pth")
  _simmim_file(src, fx.state_dict)
  file = torch_files.read_state_dict(src)
  windows = [2 * w - 1 for w in kwargs["window_size"]]  # other sizes than the file's
  target = _ait_with_backbone({**kwargs, "window_size": windows})
  assert pretrained.detect_role(file, target) == "backbone"
  part = pretrained.import_part(file, "backbone", target)

  # The position-bias MLP and every other weight transfer; only the tables change.
  n = len(kwargs["depths"]) - 1
  assert part.missing == [f"norm{n}.weight", f"norm{n}.bias"]
  assert sorted(part.unexpected) == ["mask_token", "norm.bias", "norm.weight"]
  assert not part.shape and not part.value
  ignored = dict(part.ignored)
  assert ignored["decoder.0.weight"] == "outside the backbone"
  assert ignored["layers.0.blocks.0.attn.relative_position_index"].startswith("derived")
  assert not any("WARNING" in note for note in part.notes), part.notes
  exported = mapping.to_torch({"params": _with_norm(part, n)},
                              swin_v2_entries(target.backbone))
  for k, v in fx.state_dict.items():
    if any(t in k for t in pretrained.DERIVED_TABLES):
      stage = int(k.split(".")[1])
      window, pretrain = windows[stage], kwargs["pretrain_window_size"][stage]
      want = (swin_v2_tables.relative_coords_table(window, pretrain) if "coords" in k
              else swin_v2_tables.relative_position_index(window))
      np.testing.assert_array_equal(exported[k], want, err_msg=k)
      assert exported[k].shape != v.shape
    elif not k.startswith("norm"):
      np.testing.assert_array_equal(exported[k], v, err_msg=k)

  # A config that scales offsets differently from pretraining is warned about.
  wrong = [2 * p for p in kwargs["pretrain_window_size"]]
  part = pretrained.import_part(file, "backbone", _ait_with_backbone(
      {**kwargs, "window_size": windows, "pretrain_window_size": wrong}))
  warnings = [note for note in part.notes if note.startswith("WARNING")]
  assert len(warnings) == len(wrong)
  assert f"pretrain window of {kwargs['pretrain_window_size'][0]}," in warnings[0]


def _with_norm(part, n):
  """The imported backbone parameters plus the `norm{n}` a SimMIM file does not have."""
  params = mapping.unflatten(part.loaded)["model"]["params"]["backbone"]
  dim = params["patch_embed"]["norm"]["scale"].shape[0] * 2 ** n
  return {**params, f"norm{n}": {"scale": np.ones(dim, np.float32),
                                 "bias": np.zeros(dim, np.float32)}}


def test_mismatched_file_gets_one_error_listing_everything(tmp_path):
  fx = _e2e_fixture()
  cfg = _e2e_config(fx)
  sd = dict(fx.state_dict)
  del sd["transformer.proj.bias"]
  sd["transformer.extra.weight"] = np.zeros(3, np.float32)
  sd["backbone.norm3.weight"] = np.zeros(5, np.float32)
  src = str(tmp_path / "bad.safetensors")
  torch_files.write_safetensors(src, sd)
  with pytest.raises(pretrained.IncompleteImport) as err:
    convert.from_torch(cfg, [src], str(tmp_path / "wd"))
  msg = str(err.value)
  assert "missing keys (1): transformer.proj.bias" in msg
  assert "unexpected keys (1): transformer.extra.weight" in msg
  assert "shape mismatch: backbone.norm3.weight has (5,)" in msg
  # With the flag, what fits is loaded and the rest listed (checked without writing).
  target = convert.target_of(cfg)
  part = pretrained.import_part(torch_files.read_state_dict(src), "ait", target)
  combined = pretrained.combine([part], target)
  pretrained.check(combined, allow_partial=True, what="it")
  # transformer.proj.bias still came from the head's copy of the transformer.
  assert part.missing == ["transformer.proj.bias"]
  assert combined.not_loaded == ["backbone.norm3.weight"]


def test_conflicts_and_disagreeing_values_fail_even_when_partial(tmp_path):
  fx = _e2e_fixture()
  target = convert.target_of(_e2e_config(fx))
  src = str(tmp_path / "ait.safetensors")
  torch_files.write_safetensors(src, fx.state_dict)
  file = torch_files.read_state_dict(src)
  both = pretrained.combine([pretrained.import_part(file, r, target)
                             for r in ("ait", "backbone")], target)
  with pytest.raises(pretrained.IncompleteImport, match="patch_embed.proj.weight is given "
                     "by both"):
    pretrained.check(both, allow_partial=True, what="it")
  sd = dict(fx.state_dict)
  sd["depth_head.transformer.outp_bias"] = sd["depth_head.transformer.outp_bias"] + 1
  file = torch_files.StateDictFile("edited", sd, [])
  part = pretrained.import_part(file, "ait", target)
  with pytest.raises(pretrained.IncompleteImport, match="value mismatch: depth_head."
                     "transformer.outp_bias: differs from transformer.outp_bias"):
    pretrained.check(pretrained.combine([part], target), allow_partial=True, what="it")


def test_vqvae_file_forms_and_roles(tmp_path):
  found = [fx for fx in kind_fixtures() if fx.kind == "vqvae"]
  if not found:
    pytest.skip("no vqvae fixture")
  fx = found[0]
  entries = vqvae_entries(vqvae_from_reference_kwargs(fx.config["kwargs"], "ait"))
  # The training script's layout: DDP keys under 'weights', and a stray codebook.
  src = str(tmp_path / "vqvae.pt")
  write_torch_zip(src, {"weights": {**{f"module.{k}": v for k, v in fx.state_dict.items()},
                                    "module.codebook.weight": np.zeros((2, 2), np.float32)}})
  file = torch_files.read_state_dict(src)
  other = vqvae_entries(vqvae_from_reference_kwargs(
      {**fx.config["kwargs"], "num_embeddings": 2 * fx.config["kwargs"]["num_embeddings"]},
      "ait"))
  target = pretrained.Target(entries + other, {"depth": entries, "insseg": other})
  assert pretrained.detect_role(file, target) == "depth"  # the one it fits
  part = pretrained.import_part(file, "depth", target)
  assert part.complete and [k for k, _ in part.ignored] == ["codebook.weight"]
  with pytest.raises(ValueError, match="fits none of this config's tokenizers"):
    pretrained.detect_role(file, pretrained.Target(other + other,
                                                   {"depth": other, "insseg": other}))


# Full size. Full-size reference models through the reference file formats.
# 
# For every manifest fixture (the reference's full-size configs), zero weights of the
# model's parameter shapes (the shapes `jax.eval_shape` gives the modules:
# test_reference_parity's test_manifest checks the mapping covers them) are written as a
# reference file and read back: the file holds exactly the manifest's keys, shapes and
# dtypes, and importing it gives every parameter back bit for bit. With torch, a torch
# module with the manifest's keys and shapes loads the state_dict with `strict=True`; for
# the largest model it also goes through a `torch.save` file.
# Manifests with identical layouts (e.g. a config and its `_wosoft` variant) share one
# round trip.

_DONE: set = set()  # layouts already round-tripped


def _manifests() -> list:
  return sorted(fixtures_dir().glob("manifest_*.json"))


@functools.cache
def _largest():
  return max(_manifests(), key=lambda p: json.loads(p.read_text())["state_dict_numel"])


def _target(manifest: dict) -> tuple[pretrained.Target, str]:
  if "model_cfg" in manifest:
    return pretrained.ait_target(ait_from_reference_config(manifest["model_cfg"])), "ait"
  entries = vqvae_entries(vqvae_from_reference_kwargs(manifest["kwargs"], "ait"))
  return pretrained.Target(entries, {"tokenizer": entries}), "tokenizer"


@pytest.fixture
def scratch(tmp_path):
  """A directory in memory when the machine has one (the files are up to 1 GB)."""
  shm = "/dev/shm"
  if os.path.isdir(shm) and os.access(shm, os.W_OK):
    path = os.path.join(shm, f"ait_jax_test_{os.getpid()}")
    os.makedirs(path, exist_ok=True)
    yield path
    for name in os.listdir(path):
      os.remove(os.path.join(path, name))
    os.rmdir(path)
  else:
    yield str(tmp_path)


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: p.stem)
def test_full_size_weights_round_trip_through_files(path, scratch):
  manifest = json.loads(path.read_text())
  layout = {k: (tuple(v["shape"]), v["dtype"]) for k, v in manifest["state_dict"].items()}
  target, role = _target(manifest)
  assert {e.torch_key: (e.torch_shape if isinstance(e, mapping.Param) else e.value.shape)
          for e in target.entries} == {k: s for k, (s, _) in layout.items()}
  signature = tuple(sorted(layout.items()))
  if signature in _DONE:
    return
  zeros = {e.flax_path: np.zeros(e.flax_shape, np.float32) for e in target.entries
           if isinstance(e, mapping.Param)}
  sd = mapping.to_torch(mapping.unflatten(zeros), target.entries)
  if torch_files.torch_available():
    import torch  # pylint: disable=g-import-not-at-top
    # `assign` puts the tensors into the shape-only (meta) module; keys and shapes are
    # checked first.
    convert_utils.module_tree(layout, torch, device="meta").load_state_dict(
        {k: torch.from_numpy(v) for k, v in sd.items()}, strict=True, assign=True)
  # Through the files: safetensors always, a torch file for the largest model.
  stem = os.path.join(scratch, path.stem)
  if path == _largest():
    written = torch_files.write_state_dict(stem, sd)
  else:
    written = [stem + ".safetensors"]
    torch_files.write_safetensors(written[0], sd)
  del sd
  file = torch_files.read_state_dict(written[0])
  assert {k: (v.shape, str(v.dtype)) for k, v in file.state_dict.items()} == layout
  part = pretrained.import_part(file, role, target)
  assert part.complete and part.loaded.keys() == zeros.keys(), part.problems()
  assert all(v.dtype == np.float32 and v.shape == zeros[p].shape and not np.any(v)
             for p, v in part.loaded.items())
  del file, part
  if len(written) > 1:
    import torch  # pylint: disable=g-import-not-at-top
    loaded = torch.load(written[1], weights_only=True, mmap=True)
    assert {k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in loaded.items()} == layout
    convert_utils.module_tree(layout, torch, device="meta").load_state_dict(loaded, strict=True,
                                                              assign=True)
    del loaded
  for file_path in written:
    os.remove(file_path)
  _DONE.add(signature)



def _config_files() -> list:
  """The configs in configs/ that have a manifest of the same name."""
  return sorted(p for p in (REPO / "configs").glob("*.py")
                if (fixtures_dir() / f"manifest_{p.stem}.json").exists())


@pytest.mark.slow
@pytest.mark.parametrize("config_path", _config_files(), ids=lambda p: p.stem)
def test_full_size_config_through_a_workdir(config_path, scratch):
  """A full-size reference file -> the trainer's checkpoint -> the same file layout."""
  cfg = trainer.load_config_file(str(config_path))
  manifest = json.loads((fixtures_dir() / f"manifest_{config_path.stem}.json").read_text())
  layout = {k: (tuple(v["shape"]), v["dtype"]) for k, v in manifest["state_dict"].items()}
  target = convert.target_of(cfg)
  zeros = {e.flax_path: np.zeros(e.flax_shape, np.float32) for e in target.entries
           if isinstance(e, mapping.Param)}
  src = os.path.join(scratch, "in.safetensors")
  torch_files.write_safetensors(src, mapping.to_torch(mapping.unflatten(zeros),
                                                      target.entries))
  workdir = os.path.join(scratch, "workdir")
  try:
    convert.from_torch(cfg, [src], workdir)
  except ValueError as e:
    if "has no trainer yet" in str(e):
      pytest.skip(str(e))
    raise
  written = convert.to_torch(cfg, workdir, os.path.join(scratch, "out"))
  for path in written:
    sd = torch_files.read_state_dict(path).state_dict
    assert {k: (v.shape, str(v.dtype)) for k, v in sd.items()} == layout
    assert not any(np.any(sd[k]) for k in sd if k not in {
        e.torch_key for e in target.entries if isinstance(e, mapping.Buffer)})
  shutil.rmtree(workdir)


# --- configs/: the full-size experiment configs are the reference's models ---------------

def _configs_with_manifest() -> list:
  return sorted(p for p in (REPO / "configs").glob("*.py")
                if (fixtures_dir() / f"manifest_{p.stem}.json").exists())


def _plain(value):
  """Tuples as lists, as JSON has them."""
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


@pytest.mark.parametrize("config_path", _configs_with_manifest(), ids=lambda p: p.stem)
def test_config_is_the_reference_model(config_path):
  """A config named like a manifest builds exactly the manifest's model (whose counts and
  layout test_manifest checks), with the reference's vocabulary offsets."""
  cfg = trainer.load_config_file(str(config_path))
  manifest = json.loads((fixtures_dir() / f"manifest_{config_path.stem}.json").read_text())
  if "model_cfg" in manifest:
    assert _plain(cfg.model.to_dict()) == _plain(manifest["model_cfg"])
    vocab_path = fixtures_dir() / "vocab_config.json"
    configs = json.loads(vocab_path.read_text())["configs"] if vocab_path.exists() else {}
    if config_path.stem in configs:
      want = configs[config_path.stem]["transformer"]
      got = ait_from_reference_config(cfg.model.to_dict()).model.transformer.vocab.offsets()
      assert {k: want[k] for k in got} == got
  else:
    trained = vqvae_entries(vqvae_from_reference_kwargs(cfg.model.to_dict(), "train"))
    wanted = {k: tuple(v["shape"]) for k, v in manifest["state_dict"].items()}
    assert {e.torch_key: e.torch_shape for e in trained} == wanted
