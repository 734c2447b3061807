"""SwinV2 backbone <-> the reference `SwinV2TransformerRPE2FC` (config and weights)."""

from collections.abc import Mapping

import jax.numpy as jnp

from ait_jax.checkpoint.mapping import Buffer, Entry, param
from ait_jax.models import swin_v2_tables as tables
from ait_jax.models.swin_v2 import SwinV2

REFERENCE_CLASS = "SwinV2TransformerRPE2FC"

# The reference constructor's defaults (norm_layer, a callable, is handled apart).
REFERENCE_DEFAULTS = dict(
    pretrain_img_size=224, patch_size=4, in_chans=3, embed_dim=96, depths=[2, 2, 6, 2],
    num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4.0, qkv_bias=True,
    qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1, ape=False,
    patch_norm=True, use_checkpoint=False, init_values=1e-5, endnorm_interval=-1,
    use_mlp_norm_layers=[], relative_coords_table_type="norm8_log_bylayer",
    rpe_hidden_dim=512, attn_type="cosine_mh", rpe_output_type="sigmoid", rpe_wd=False,
    postnorm=True, mlp_type="normal", patch_embed_type="normal",
    patch_merge_type="normal", strid16=False, checkpoint_blocks=[255, 255, 255, 255],
    mlpfp32_layer_blocks=[[-1], [-1], [-1], [-1]], out_indices=(0, 1, 2, 3),
    frozen_stages=-1, use_shift=True, rpe_interpolation="geo",
    pretrain_window_size=[-1, -1, -1, -1], init_cfg=None, head_chunk_size=1)

# Options the port supports only at their default value.
_FIXED = ("qkv_bias", "drop_rate", "attn_drop_rate", "ape", "patch_norm",
          "endnorm_interval", "use_mlp_norm_layers", "relative_coords_table_type",
          "attn_type", "rpe_output_type", "postnorm", "mlp_type", "patch_embed_type",
          "patch_merge_type", "strid16", "mlpfp32_layer_blocks", "frozen_stages")

# Options without effect on the forward pass of this configuration: `pretrain_img_size`
# (only with ape), `qk_scale` (only for attn_type 'normal'), `init_values` (only for
# pre-norm blocks), `rpe_wd`, `rpe_interpolation` and `checkpoint_blocks` (stored,
# never read), `init_cfg` (weights come through `swin_v2_entries`) and
# `head_chunk_size` (splits the same computation into head groups).
_INERT = ("pretrain_img_size", "qk_scale", "init_values", "rpe_wd", "rpe_interpolation",
          "checkpoint_blocks", "init_cfg", "head_chunk_size")


def _per_stage(name: str, value, n: int, kind) -> tuple:
  if isinstance(value, kind):
    return (value,) * n
  value = tuple(value)
  if len(value) != n:
    raise ValueError(f"SwinV2 option {name}={list(value)} needs one entry per stage "
                     f"({n})")
  return value


def _normalise(value):
  return [_normalise(v) for v in value] if isinstance(value, (list, tuple)) else value


def swin_v2_from_reference_kwargs(kwargs: Mapping, *, dtype=jnp.float32) -> SwinV2:
  """The module for a reference `model.backbone` dict (unset keys take class defaults).

  Raises ValueError naming any option the port does not implement.
  """
  kwargs = dict(kwargs)
  cls = kwargs.pop("type", REFERENCE_CLASS)
  if cls != REFERENCE_CLASS:
    raise ValueError(f"backbone type {cls!r} is not supported; only {REFERENCE_CLASS}")
  if "norm_layer" in kwargs:
    raise ValueError("SwinV2 option norm_layer is not supported: the port always uses "
                     "the default LayerNormFP32 with eps 1e-6")
  unknown = sorted(set(kwargs) - set(REFERENCE_DEFAULTS))
  if unknown:
    raise ValueError(f"unknown {REFERENCE_CLASS} options: {', '.join(unknown)}")
  cfg = {**REFERENCE_DEFAULTS, **kwargs}
  for name in _FIXED:
    if _normalise(cfg[name]) != _normalise(REFERENCE_DEFAULTS[name]):
      raise ValueError(f"SwinV2 option {name}={cfg[name]!r} is not implemented (only "
                       f"the default {REFERENCE_DEFAULTS[name]!r})")
  n = len(cfg["depths"])
  remat = set(_per_stage("use_checkpoint", cfg["use_checkpoint"], n, bool))
  if len(remat) != 1:
    raise ValueError(f"SwinV2 option use_checkpoint={cfg['use_checkpoint']!r}: "
                     "rematerialisation is one switch for all stages here")
  return SwinV2(
      embed_dim=int(cfg["embed_dim"]),
      depths=tuple(int(d) for d in cfg["depths"]),
      num_heads=tuple(int(h) for h in cfg["num_heads"]),
      window_sizes=_per_stage("window_size", cfg["window_size"], n, int),
      pretrain_window_sizes=_per_stage("pretrain_window_size",
                                       cfg["pretrain_window_size"], n, int),
      shifts=_per_stage("use_shift", cfg["use_shift"], n, bool),
      out_indices=tuple(int(i) for i in cfg["out_indices"]),
      drop_path_rate=float(cfg["drop_path_rate"]),
      patch_size=int(cfg["patch_size"]),
      in_chans=int(cfg["in_chans"]),
      mlp_ratio=float(cfg["mlp_ratio"]),
      rpe_hidden_dim=int(cfg["rpe_hidden_dim"]),
      remat=remat.pop(),
      dtype=dtype)


def _layer_norm(torch_prefix: str, path: tuple, dim: int) -> list[Entry]:
  return [param(torch_prefix + ".weight", (*path, "scale"), (dim,)),
          param(torch_prefix + ".bias", (*path, "bias"), (dim,))]


def _linear(torch_prefix: str, path: tuple, d_in: int, d_out: int,
            bias: bool = True) -> list[Entry]:
  out = [param(torch_prefix + ".weight", (*path, "kernel"), (d_in, d_out), "linear")]
  if bias:
    out.append(param(torch_prefix + ".bias", (*path, "bias"), (d_out,)))
  return out


def _block(t: str, path: tuple, dim: int, heads: int, model: SwinV2, coords_table,
           position_index) -> list[Entry]:
  attn = (*path, "attn")
  return [
      *_layer_norm(t + "norm1", (*path, "norm1"), dim),
      param(t + "attn.logit_scale", (*attn, "logit_scale"), (heads,), "reshape",
            torch_shape=(heads, 1, 1)),
      param(t + "attn.q_bias", (*attn, "q_bias"), (dim,)),
      param(t + "attn.v_bias", (*attn, "v_bias"), (dim,)),
      Buffer(t + "attn.relative_coords_table", coords_table, atol=1e-6),
      Buffer(t + "attn.relative_position_index", position_index),
      *_linear(t + "attn.rpe_mlp.0", (*attn, "rpe_hidden"), 2, model.rpe_hidden_dim),
      *_linear(t + "attn.rpe_mlp.2", (*attn, "rpe_out"), model.rpe_hidden_dim, heads,
               bias=False),
      *_linear(t + "attn.qkv", (*attn, "qkv"), dim, 3 * dim, bias=False),
      *_linear(t + "attn.proj", (*attn, "proj"), dim, dim),
      *_layer_norm(t + "norm2", (*path, "norm2"), dim),
      *_linear(t + "mlp.fc1", (*path, "mlp", "fc1"), dim, int(dim * model.mlp_ratio)),
      *_linear(t + "mlp.fc2", (*path, "mlp", "fc2"), int(dim * model.mlp_ratio), dim),
  ]


def swin_v2_entries(model: SwinV2) -> list[Entry]:
  """Mapping entries in the reference state_dict order, derived buffers included."""
  p, c = model.patch_size, model.embed_dim
  root = ("params",)
  entries = [
      param("patch_embed.proj.weight", (*root, "patch_embed", "proj", "kernel"),
            (p, p, model.in_chans, c), "conv"),
      param("patch_embed.proj.bias", (*root, "patch_embed", "proj", "bias"), (c,)),
      *_layer_norm("patch_embed.norm", (*root, "patch_embed", "norm"), c),
  ]
  dims = model.stage_dims()
  for i, depth in enumerate(model.depths):
    window = model.window_sizes[i]
    # One array per stage, shared by its blocks (the index is 6.5 MB at window 30).
    coords_table = tables.relative_coords_table(window, model.pretrain_window_sizes[i])
    position_index = tables.relative_position_index(window)
    stage = (*root, f"layers_{i}")
    for j in range(depth):
      entries += _block(f"layers.{i}.blocks.{j}.", (*stage, f"blocks_{j}"), dims[i],
                        model.num_heads[i], model, coords_table, position_index)
    if i < len(model.depths) - 1:
      entries += _linear(f"layers.{i}.downsample.reduction",
                         (*stage, "downsample", "reduction"), 4 * dims[i], 2 * dims[i],
                         bias=False)
      entries += _layer_norm(f"layers.{i}.downsample.norm",
                             (*stage, "downsample", "norm"), 2 * dims[i])
  for i in model.out_indices:
    entries += _layer_norm(f"norm{i}", (*root, f"norm{i}"), dims[i])
  return entries
