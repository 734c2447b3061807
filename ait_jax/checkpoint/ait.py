"""The whole reference AiT (config and state_dict) <-> this project's modules.

A reference AiT state_dict holds `backbone.*`, `transformer.*`, and per task head a
second copy of the shared transformer (`{task}_head.transformer.*`), the head's frozen
tokenizer (`{task}_head.vqvae.*`) and, for instance segmentation, the class weights of
its loss (`insseg_head.loss_seq.weight`). Here that becomes one variables tree:

  {'model': {'params': {'backbone': ..., 'transformer': ...}},
   'tokenizers': {task: {'params': ..., 'vq': ...}}}

The transformer copies must agree; the class weights are recomputed from the head
config and checked.
"""

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp

from ait_jax.checkpoint.mapping import Buffer, Entry, prefixed
from ait_jax.checkpoint.swin_v2 import swin_v2_entries, swin_v2_from_reference_kwargs
from ait_jax.checkpoint.transformer import (transformer_entries,
                                            transformer_from_reference_kwargs)
from ait_jax.checkpoint.vqvae import vqvae_entries, vqvae_from_reference_kwargs
from ait_jax.models.ait import AiT
from ait_jax.models.vqvae import VQVAE
from ait_jax.tasks.insseg import token_class_weights

HEAD_TYPES = {"det": "DetHead", "insseg": "InsSegHead", "depth": "DepthHead"}
TOKENIZED_TASKS = ("insseg", "depth")
# Top-level AiT keywords that do not change the weights.
_AIT_KEYS = {"type", "backbone", "transformer", "task_heads", "padto", "resizeto",
             "loss_exclude_offset", "init_cfg"}
# InsSegHead's defaults for its loss weights.
_INSSEG_WEIGHT_DEFAULTS = {"box_weight": 1.0, "cls_weight": 1.0, "mask_weight": 1.0}


@dataclasses.dataclass(frozen=True)
class ReferenceAiT:
  """What a reference `model` config builds here."""
  model: AiT
  tokenizers: dict[str, VQVAE]  # by task: 'insseg', 'depth'
  task_heads: dict[str, dict]   # the reference head configs, in their order


def ait_from_reference_config(model_cfg: Mapping, *, dtype=jnp.float32) -> ReferenceAiT:
  """Modules for a reference config's `model` dict (type 'AiT')."""
  cfg = dict(model_cfg)
  if cfg.get("type", "AiT") != "AiT":
    raise ValueError(f"model type {cfg['type']!r} is not supported; only 'AiT'")
  unknown = sorted(set(cfg) - _AIT_KEYS)
  if unknown:
    raise ValueError(f"unknown AiT options: {', '.join(unknown)}")
  backbone = swin_v2_from_reference_kwargs(cfg["backbone"], dtype=dtype)
  transformer = transformer_from_reference_kwargs(cfg["transformer"], dtype=dtype)
  width = backbone.stage_dims()[backbone.out_indices[0]]
  if transformer.in_chans != width:
    raise ValueError(f"transformer.in_chans={transformer.in_chans}, but the backbone's "
                     f"first output (stage {backbone.out_indices[0]}) has {width} channels")
  heads = dict(cfg.get("task_heads", {}))
  for task, head in heads.items():
    want = HEAD_TYPES.get(task)
    if want is None or head.get("type", want) != want:
      raise ValueError(f"task head {task!r} (type {head.get('type')!r}) is not supported; "
                       f"known: {HEAD_TYPES}")
  tokenizers = {task: vqvae_from_reference_kwargs(heads[task]["vae_cfg"], "ait")
                for task in heads if task in TOKENIZED_TASKS}
  return ReferenceAiT(AiT(backbone, transformer), tokenizers, heads)


def ait_entries(ref: ReferenceAiT) -> list[Entry]:
  """Mapping entries of the full reference state_dict, in its key order."""
  model = ("model",)
  shared = transformer_entries(ref.model.transformer)
  entries = prefixed(swin_v2_entries(ref.model.backbone), "backbone.", ("backbone",), model)
  entries += prefixed(shared, "transformer.", ("transformer",), model)
  for task, head in ref.task_heads.items():
    entries += prefixed(shared, f"{task}_head.transformer.", ("transformer",), model)
    if task in ref.tokenizers:
      entries += prefixed(vqvae_entries(ref.tokenizers[task]), f"{task}_head.vqvae.",
                          flax_root=("tokenizers", task))
    if task == "insseg":
      weights = {k: float(head.get(k, v)) for k, v in _INSSEG_WEIGHT_DEFAULTS.items()}
      entries.append(Buffer("insseg_head.loss_seq.weight", token_class_weights(
          ref.model.transformer.vocab, **weights)))
  return entries
