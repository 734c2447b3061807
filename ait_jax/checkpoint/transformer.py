"""ARTransformer <-> the reference `ARTransformer` (config and weights)."""

from collections.abc import Mapping

import jax.numpy as jnp

from ait_jax.checkpoint.mapping import Buffer, Entry, param
from ait_jax.models.transformer import ARTransformer, sine_position_table
from ait_jax.models.vocab import Vocab

REFERENCE_CLASS = "ARTransformer"

# The reference constructor's defaults (`in_chans` has none).
REFERENCE_DEFAULTS = dict(
    d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
    dim_feedforward=1024, drop_path=0.1, drop_out=0.1, drop_path_linear=False,
    num_vocal=2094, dec_length=2100, pred_eos=False, num_bins=2001, num_classes=80,
    num_embeddings=128, num_embeddings_depth=128, checkpoint_encoder=False,
    checkpoint_decoder=False, top_p=0.4, delay_eos=0, qk_pos=False, enc_mask=False,
    dec_mask=False, pos_enc="sine", n_rows=20, n_cols=20, mask_before_label=False,
    ntasks=4, with_dec_embed=True, soft_vae=False, soft_transformer=False,
    parallel=False, head_args={})

# Options the port supports only at their default value.
_FIXED = ("pred_eos", "qk_pos", "enc_mask", "dec_mask", "with_dec_embed")

# Accepted without effect here: `soft_vae` (the decoders always return the code logits
# that soft VQ-VAE decoding needs; the heads choose), `delay_eos` (acts only with
# pred_eos) and `head_args` (stored, never read).

SINE_TABLE_ATOL = 1e-5  # the reference computes the table in float32


def transformer_from_reference_kwargs(kwargs: Mapping, *,
                                      dtype=jnp.float32) -> ARTransformer:
  """The module for a reference `model.transformer` dict (unset keys take class
  defaults). Raises ValueError naming every option the port does not implement."""
  kwargs = dict(kwargs)
  cls = kwargs.pop("type", REFERENCE_CLASS)
  if cls != REFERENCE_CLASS:
    raise ValueError(f"transformer type {cls!r} is not supported; only {REFERENCE_CLASS}")
  if "in_chans" not in kwargs:
    raise ValueError(f"{REFERENCE_CLASS} needs in_chans (the backbone's output channels)")
  unknown = sorted(set(kwargs) - set(REFERENCE_DEFAULTS) - {"in_chans"})
  if unknown:
    raise ValueError(f"unknown {REFERENCE_CLASS} options: {', '.join(unknown)}")
  cfg = {**REFERENCE_DEFAULTS, **kwargs}
  problems = [f"{name}={cfg[name]!r} (only {REFERENCE_DEFAULTS[name]!r})"
              for name in _FIXED if cfg[name] != REFERENCE_DEFAULTS[name]]
  if cfg["d_model"] % cfg["nhead"]:
    problems.append(f"d_model={cfg['d_model']} is not a multiple of nhead={cfg['nhead']}")
  if problems:
    raise ValueError(f"{REFERENCE_CLASS} options not implemented: " + "; ".join(problems))
  return ARTransformer(
      vocab=Vocab.from_reference(cfg),
      in_chans=int(cfg["in_chans"]),
      d_model=int(cfg["d_model"]),
      num_heads=int(cfg["nhead"]),
      num_encoder_layers=int(cfg["num_encoder_layers"]),
      num_decoder_layers=int(cfg["num_decoder_layers"]),
      mlp_dim=int(cfg["dim_feedforward"]),
      drop_path_rate=float(cfg["drop_path"]),
      dropout_rate=float(cfg["drop_out"]),
      drop_path_linear=bool(cfg["drop_path_linear"]),
      dec_length=int(cfg["dec_length"]),
      n_rows=int(cfg["n_rows"]),
      n_cols=int(cfg["n_cols"]),
      pos_enc=str(cfg["pos_enc"]),
      ntasks=int(cfg["ntasks"]),
      parallel=bool(cfg["parallel"]),
      soft_transformer=bool(cfg["soft_transformer"]),
      top_p=float(cfg["top_p"]),
      mask_before_label=bool(cfg["mask_before_label"]),
      remat_encoder=bool(cfg["checkpoint_encoder"]),
      remat_decoder=bool(cfg["checkpoint_decoder"]),
      dtype=dtype)


def _layer_norm(torch_prefix: str, path: tuple, dim: int) -> list[Entry]:
  return [param(torch_prefix + ".weight", (*path, "scale"), (dim,)),
          param(torch_prefix + ".bias", (*path, "bias"), (dim,))]


def _linear(torch_prefix: str, path: tuple, d_in: int, d_out: int) -> list[Entry]:
  return [param(torch_prefix + ".weight", (*path, "kernel"), (d_in, d_out), "linear"),
          param(torch_prefix + ".bias", (*path, "bias"), (d_out,))]


def _attention(torch_prefix: str, path: tuple, d: int) -> list[Entry]:
  return [e for name in ("wq", "wk", "wv", "proj")
          for e in _linear(f"{torch_prefix}.{name}", (*path, name), d, d)]


def _mlp(torch_prefix: str, path: tuple, d: int, hidden: int) -> list[Entry]:
  return [*_linear(torch_prefix + ".fc1", (*path, "fc1"), d, hidden),
          *_linear(torch_prefix + ".fc2", (*path, "fc2"), hidden, d)]


def transformer_entries(model: ARTransformer) -> list[Entry]:
  """Mapping entries in the reference state_dict order, the sine table included."""
  d, v, f = model.d_model, model.vocab.size, model.mlp_dim
  rows, cols = model.n_rows, model.n_cols
  root = ("params",)
  entries = []
  # The reference's own parameters come first, then its buffer, then its submodules.
  if model.pos_enc == "learned":
    entries.append(param("enc_embed", (*root, "enc_embed"), (rows * cols, d), "reshape",
                         torch_shape=(1, rows, cols, d)))
  if model.parallel:
    entries.append(param("mask_embed", (*root, "mask_embed"), (d,), "reshape",
                         torch_shape=(1, 1, d)))
  entries += [
      param("det_embed", (*root, "det_embed"), (model.ntasks, d), "reshape",
            torch_shape=(model.ntasks, 1, d)),
      param("voc_embed", (*root, "voc_embed"), (v, d)),
      param("dec_embed", (*root, "dec_embed"), (model.ntasks, model.dec_length, d)),
      param("outp_bias", (*root, "outp_bias"), (v,)),
  ]
  if model.pos_enc != "learned":
    table = sine_position_table(rows, cols, d, normalize=model.pos_enc == "sine_norm")
    entries.append(Buffer("enc_embed", table[None], atol=SINE_TABLE_ATOL))
  entries += _linear("input_proj", (*root, "input_proj"), model.in_chans, d)
  for i in range(model.num_encoder_layers):
    t, path = f"encoder.blocks.{i}.", (*root, f"encoder_blocks_{i}")
    entries += [*_layer_norm(t + "norm1", (*path, "norm1"), d),
                *_attention(t + "attn", (*path, "attn"), d),
                *_layer_norm(t + "norm2", (*path, "norm2"), d),
                *_mlp(t + "mlp", (*path, "mlp"), d, f)]
  for i in range(model.num_decoder_layers):
    t, path = f"decoder.blocks.{i}.", (*root, f"decoder_blocks_{i}")
    entries += [*_layer_norm(t + "norm1", (*path, "norm1"), d),
                *_attention(t + "attn", (*path, "attn"), d),
                *_layer_norm(t + "norm2", (*path, "norm2"), d),
                *_attention(t + "crossattn", (*path, "crossattn"), d),
                *_layer_norm(t + "norm3", (*path, "norm3"), d),
                *_mlp(t + "mlp", (*path, "mlp"), d, f)]
  entries += [*_layer_norm("norm", (*root, "norm"), d),
              *_layer_norm("stem_ln", (*root, "stem_ln"), d),
              *_layer_norm("encout_ln", (*root, "encout_ln"), d),
              *_linear("proj", (*root, "proj"), d, d),
              *_layer_norm("proj_ln", (*root, "proj_ln"), d),
              *_mlp("proj_mlp", (*root, "proj_mlp"), d, f),
              *_layer_norm("proj_mlp_ln", (*root, "proj_mlp_ln"), d)]
  return entries
