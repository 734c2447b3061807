"""Logical axis names that parameters and activations carry.

Modules attach them with `flax.linen.with_logical_partitioning`; `ait_jax.parallel`
holds the single table that maps them to mesh axes (`data`, `fsdp`, `tensor`). A name
says what a dimension is, never how it is sharded.
"""

BATCH = "batch"          # examples
LENGTH = "length"        # token positions (sequence or flattened spatial)
EMBED = "embed"          # model width / channels of a token
MLP = "mlp"              # hidden width of feed-forward layers
HEADS = "heads"          # attention heads
KV = "kv"                # per-head width
QKV = "qkv"              # the fused q/k/v output of Swin's attention (3 * embed)
VOCAB = "vocab"          # shared output vocabulary
CODEBOOK = "codebook"    # VQ codebook entries
CONV_IN = "conv_in"      # input channels of a convolution
CONV_OUT = "conv_out"    # output channels of a convolution
CONV_H = "conv_h"        # kernel rows
CONV_W = "conv_w"        # kernel columns
RPE_HIDDEN = "rpe_hidden"  # hidden width of Swin's relative-position MLP
RPE_COORD = "rpe_coord"  # the 2 coordinates fed to that MLP
TASKS = "tasks"          # task-embedding rows
POSITIONS = "positions"  # rows of a learned position table

ALL = frozenset({BATCH, LENGTH, EMBED, MLP, HEADS, KV, QKV, VOCAB, CODEBOOK, CONV_IN,
                 CONV_OUT, CONV_H, CONV_W, RPE_HIDDEN, RPE_COORD, TASKS, POSITIONS})
