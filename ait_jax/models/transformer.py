"""AiT's encoder-decoder transformer, equal to the reference's `ARTransformer`.

The encoder reads the backbone's last feature map (NHWC); the pre-norm decoder predicts
tokens of the shared vocabulary (`vocab.Vocab`) with logits tied to the token embeddings:
`norm(x) @ voc_embed.T + outp_bias`. This file holds the layers, the teacher-forced
forward and one cached decoder step; `decoding.py` holds the inference loops.

Parameter layouts differ from the reference's only where Flax needs it: Dense kernels are
(in, out), `det_embed` is (ntasks, d) and `mask_embed` (d,) without the reference's unit
axes, and a learned `enc_embed` is flattened to (n_rows * n_cols, d).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ait_jax.models import axes
from ait_jax.models.vocab import Vocab

DET_TASK, INSSEG_TASK, DEPTH_TASK = 0, 1, 2  # rows of det_embed / dec_embed
LN_EPS = 1e-5
POS_ENCODINGS = ("sine", "sine_norm", "learned")

# timm's trunc_normal_(std=.02) cuts at +-2 in absolute value, i.e. 100 std: a normal.
_normal = nn.initializers.normal(0.02)


def _partitioned(init_fn, *names):
  return nn.with_logical_partitioning(init_fn, names)


def _dense(features: int, names: tuple[str, str], dtype, name=None) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, name=name,
                  kernel_init=_partitioned(_normal, *names),
                  bias_init=_partitioned(nn.initializers.zeros_init(), names[1]))


def _layer_norm(name=None) -> nn.LayerNorm:
  """torch's LayerNorm: eps 1e-5, two-pass variance, computed in float32."""
  return nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, use_fast_variance=False,
                      scale_init=_partitioned(nn.initializers.ones_init(), axes.EMBED),
                      bias_init=_partitioned(nn.initializers.zeros_init(), axes.EMBED),
                      name=name)


def _drop_path(rate: float) -> nn.Dropout:
  """Stochastic depth on (B, N, D) tokens: one draw per sample."""
  return nn.Dropout(rate, broadcast_dims=(1, 2))


def sine_position_table(n_rows: int, n_cols: int, d_model: int,
                        normalize: bool = False) -> np.ndarray:
  """(n_rows, n_cols, d_model) float32 table of the reference's 'sine' encoding.

  Channels [0, d/2) encode the row, [d/2, d) the column; within a half, channel c
  holds sin (even c) or cos (odd c) of `p / 10000^(2*floor(c/2) / (d/2))`. Positions
  are integer indices, or spread over [0, 2 pi] with `normalize` ('sine_norm').
  """
  half = d_model // 2
  dim_t = 10000.0 ** (2 * (np.arange(half) // 2) / half)

  def encode(n):
    p = np.arange(n, dtype=np.float64)
    if normalize:
      p = p / (n - 1) * 2 * np.pi
    angles = p[:, None] / dim_t
    return np.where(np.arange(half) % 2 == 0, np.sin(angles), np.cos(angles))

  rows = np.broadcast_to(encode(n_rows)[:, None], (n_rows, n_cols, half))
  cols = np.broadcast_to(encode(n_cols)[None], (n_rows, n_cols, half))
  return np.concatenate([rows, cols], axis=-1).astype(np.float32)


class Attention(nn.Module):
  """Multi-head attention with separate q/k/v projections (all with bias)."""
  dim: int
  num_heads: int
  dtype: Any = jnp.float32

  def setup(self):
    self.wq = _dense(self.dim, (axes.EMBED, axes.HEADS), self.dtype)
    self.wk = _dense(self.dim, (axes.EMBED, axes.HEADS), self.dtype)
    self.wv = _dense(self.dim, (axes.EMBED, axes.HEADS), self.dtype)
    self.proj = _dense(self.dim, (axes.HEADS, axes.EMBED), self.dtype)

  def _heads(self, x):
    """(B, N, D) -> (B, heads, N, head_dim): batch dimensions first for the products."""
    b, n, _ = x.shape
    return x.reshape(b, n, self.num_heads, -1).transpose(0, 2, 1, 3)

  def keys_values(self, x):
    """(B, heads, N, head_dim) keys and values of the tokens x."""
    return self._heads(self.wk(x)), self._heads(self.wv(x))

  def _scale(self):
    return (self.dim // self.num_heads) ** -0.5

  def _merge(self, out):
    """(B, heads, Q, head_dim) -> output projection of (B, Q, D)."""
    b, _, n, _ = out.shape
    return self.proj(out.transpose(0, 2, 1, 3).reshape(b, n, self.dim))

  def attend(self, queries, k, v, visible=None):
    """Attention of `queries` (B, Q, D) to projected k, v; `visible` (.., Q, K) bool."""
    q = self._heads(self.wq(queries))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k,
                        preferred_element_type=jnp.float32) * self._scale()
    if visible is not None:
      logits = jnp.where(visible, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    return self._merge(jnp.einsum("bhqk,bhkd->bhqd", probs, v))

  def attend_cached(self, query, k, v, k_cache, v_cache, visible):
    """One query (B, 1, D) attending to its own k, v and the `visible` cache entries.

    The new key stays out of the cache here, so that writing it into the cache does
    not force a copy of the cache to feed this read.
    """
    q = self._heads(self.wq(query))
    cached = jnp.einsum("bhqd,bhkd->bhqk", q, k_cache,
                        preferred_element_type=jnp.float32)
    own = jnp.sum(q * k, axis=-1, keepdims=True, dtype=jnp.float32)
    logits = jnp.concatenate([jnp.where(visible, cached, -jnp.inf), own], axis=-1)
    probs = jax.nn.softmax(logits * self._scale(), axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs[..., :-1], v_cache) + probs[..., -1:] * v
    return self._merge(out)

  def __call__(self, queries, tokens, visible=None):
    return self.attend(queries, *self.keys_values(tokens), visible)


class Mlp(nn.Module):
  """timm's Mlp as the reference configures it: fc1, exact GELU, dropout, fc2."""
  dim: int
  hidden_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    x = _dense(self.hidden_dim, (axes.EMBED, axes.MLP), self.dtype, name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    return _dense(self.dim, (axes.MLP, axes.EMBED), self.dtype, name="fc2")(x)


class EncoderBlock(nn.Module):
  """Pre-norm self-attention block over the feature-map tokens."""
  dim: int
  num_heads: int
  mlp_dim: int
  drop_path_rate: float = 0.0
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    drop_path = _drop_path(self.drop_path_rate)
    h = _layer_norm(name="norm1")(x)
    h = Attention(self.dim, self.num_heads, self.dtype, name="attn")(h, h)
    x = x + drop_path(h, deterministic)
    h = Mlp(self.dim, self.mlp_dim, self.dropout_rate, self.dtype, name="mlp")(
        _layer_norm(name="norm2")(x), deterministic)
    return x + drop_path(h, deterministic)


class DecoderBlock(nn.Module):
  """Pre-norm decoder block; cross-attention normalizes queries AND memory with norm2."""
  dim: int
  num_heads: int
  mlp_dim: int
  drop_path_rate: float = 0.0
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  def setup(self):
    self.norm1 = _layer_norm()
    self.attn = Attention(self.dim, self.num_heads, self.dtype)
    self.norm2 = _layer_norm()
    self.crossattn = Attention(self.dim, self.num_heads, self.dtype)
    self.norm3 = _layer_norm()
    self.mlp = Mlp(self.dim, self.mlp_dim, self.dropout_rate, self.dtype)
    self.drop_path = _drop_path(self.drop_path_rate)

  def __call__(self, x, memory, deterministic: bool = True):
    """All positions at once (teacher forcing), causal self-attention."""
    n = x.shape[1]
    h = self.norm1(x)
    x = x + self.drop_path(self.attn(h, h, jnp.tril(jnp.ones((n, n), bool))),
                           deterministic)
    h = self.crossattn(self.norm2(x), self.norm2(memory))
    x = x + self.drop_path(h, deterministic)
    h = self.mlp(self.norm3(x), deterministic)
    return x + self.drop_path(h, deterministic)

  def memory_keys_values(self, memory):
    """Cross-attention keys and values of the memory, computed once per image."""
    return self.crossattn.keys_values(self.norm2(memory))

  def step(self, x, cache: dict, index):
    """One position: x (B, 1, D) at `index`; the cache holds its own keys/values."""
    h = self.norm1(x)
    k, v = self.attn.keys_values(h)
    visible = jnp.arange(cache["self_k"].shape[2]) < index
    x = x + self.attn.attend_cached(h, k, v, cache["self_k"], cache["self_v"], visible)
    self_k = jax.lax.dynamic_update_slice_in_dim(cache["self_k"], k, index, axis=2)
    self_v = jax.lax.dynamic_update_slice_in_dim(cache["self_v"], v, index, axis=2)
    x = x + self.crossattn.attend(self.norm2(x), cache["memory_k"], cache["memory_v"])
    x = x + self.mlp(self.norm3(x))
    return x, {**cache, "self_k": self_k, "self_v": self_v}


def _drop_path_rates(rate: float, n: int, linear: bool) -> list[float]:
  return [float(r) for r in np.linspace(0, rate, n)] if linear else [rate] * n


class ARTransformer(nn.Module):
  """The reference `ARTransformer` (its option names in comments where they differ).

  `parallel` adds AiT-P's `mask_embed`, fed instead of every token embedding.
  `soft_transformer` feeds code positions back as the probability-weighted code
  embedding, `top_p` is the nucleus of the sampling (0: greedy), and
  `mask_before_label` moves the class after the mask codes of an insseg object; these
  three act in `decoding.py`. Dropout and drop-path draw from the 'dropout' rng when
  `train` is set. `dtype` is the matmul dtype; LayerNorms, softmaxes and the output
  logits stay float32, as does the residual stream.
  """
  vocab: Vocab
  in_chans: int
  d_model: int = 512
  num_heads: int = 8                  # nhead
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  mlp_dim: int = 1024                 # dim_feedforward
  drop_path_rate: float = 0.1         # drop_path
  dropout_rate: float = 0.1           # drop_out
  drop_path_linear: bool = False
  dec_length: int = 2100
  n_rows: int = 20
  n_cols: int = 20
  pos_enc: str = "sine"
  ntasks: int = 4
  parallel: bool = False
  soft_transformer: bool = False
  top_p: float = 0.4
  mask_before_label: bool = False
  remat_encoder: bool = False         # checkpoint_encoder
  remat_decoder: bool = False         # checkpoint_decoder
  dtype: Any = jnp.float32

  def setup(self):
    d = self.d_model
    if self.pos_enc not in POS_ENCODINGS:
      raise ValueError(f"pos_enc {self.pos_enc!r} is not one of {POS_ENCODINGS}")
    if self.pos_enc == "learned":
      self.enc_embed = self._embedding("enc_embed", (self.n_rows * self.n_cols, d),
                                       (axes.POSITIONS, axes.EMBED))
    else:
      table = sine_position_table(self.n_rows, self.n_cols, d,
                                  normalize=self.pos_enc == "sine_norm")
      self.enc_embed = jnp.asarray(table.reshape(-1, d))
    if self.parallel:
      self.mask_embed = self._embedding("mask_embed", (d,), (axes.EMBED,))
    self.det_embed = self._embedding("det_embed", (self.ntasks, d),
                                     (axes.TASKS, axes.EMBED))
    self.voc_embed = self._embedding("voc_embed", (self.vocab.size, d),
                                     (axes.VOCAB, axes.EMBED))
    self.dec_embed = self._embedding("dec_embed", (self.ntasks, self.dec_length, d),
                                     (axes.TASKS, axes.POSITIONS, axes.EMBED))
    self.outp_bias = self._embedding("outp_bias", (self.vocab.size,), (axes.VOCAB,))

    self.input_dropout = nn.Dropout(self.dropout_rate)
    self.input_proj = _dense(d, (axes.CONV_IN, axes.EMBED), self.dtype)
    self.stem_ln = _layer_norm()
    encoder_cls = (nn.remat(EncoderBlock, static_argnums=(2,)) if self.remat_encoder
                   else EncoderBlock)
    self.encoder_blocks = [
        encoder_cls(d, self.num_heads, self.mlp_dim, rate, self.dropout_rate, self.dtype)
        for rate in _drop_path_rates(self.drop_path_rate, self.num_encoder_layers,
                                     self.drop_path_linear)]
    self.encout_ln = _layer_norm()
    self.proj = _dense(d, (axes.CONV_IN, axes.EMBED), self.dtype)
    self.proj_ln = _layer_norm()
    self.proj_mlp_ln = _layer_norm()
    self.proj_mlp = Mlp(d, self.mlp_dim, self.dropout_rate, self.dtype)
    self.proj_mlp_drop_path = _drop_path(self.drop_path_rate)

    decoder_cls = (nn.remat(DecoderBlock, static_argnums=(3,)) if self.remat_decoder
                   else DecoderBlock)
    self.decoder_blocks = [
        decoder_cls(d, self.num_heads, self.mlp_dim, rate, self.dropout_rate, self.dtype)
        for rate in _drop_path_rates(self.drop_path_rate, self.num_decoder_layers,
                                     self.drop_path_linear)]
    self.norm = _layer_norm()

  def _embedding(self, name: str, shape: tuple, names: tuple):
    # As a jax array: it is indexed with traced ids, and variables may be numpy arrays.
    return jnp.asarray(self.param(name, _partitioned(_normal, *names), shape))

  def encode(self, src, train: bool = False):
    """Memory tokens (B, h*w, d) of a feature map src (B, h, w, in_chans)."""
    b, h, w, c = src.shape
    if c != self.in_chans or h > self.n_rows or w > self.n_cols:
      raise ValueError(f"feature map {src.shape[1:]} (h, w, channels) does not fit the "
                       f"transformer: in_chans {self.in_chans}, at most {self.n_rows} "
                       f"rows and {self.n_cols} columns (n_rows, n_cols)")
    deterministic = not train
    x = self.input_dropout(src.reshape(b, h * w, c), deterministic=deterministic)
    x = self.stem_ln(self.input_proj(x))
    pos = self.enc_embed.reshape(self.n_rows, self.n_cols, -1)[:h, :w].reshape(h * w, -1)
    x = x + pos
    for block in self.encoder_blocks:
      x = block(x, deterministic)
    z = self.proj_ln(self.proj(self.encout_ln(x))) + pos
    h = self.proj_mlp(self.proj_mlp_ln(z), deterministic)
    return z + self.proj_mlp_drop_path(h, deterministic)

  def logits(self, x):
    """Tied output layer: float32 logits over the whole vocabulary."""
    # Contracting both on d: no transposed copy of the table (once per decoding step).
    return jnp.einsum("...d,vd->...v", self.norm(x), self.voc_embed) + self.outp_bias

  def __call__(self, src, input_seq, task_id, train: bool = False):
    """Teacher-forced logits (B, L+1, V) for input_seq (B, L) and task ids (B,).

    Position 0 reads the task's `det_embed`, position i > 0 the embedding of token
    i-1 (`mask_embed` for every position of an AiT-P model); each adds its
    `dec_embed[task, i]`.
    """
    memory = self.encode(src, train)
    b, n = input_seq.shape
    if n + 1 > self.dec_length:
      raise ValueError(f"{n + 1} decoder positions exceed dec_length {self.dec_length}")
    task_id = jnp.broadcast_to(jnp.asarray(task_id), (b,))
    if self.parallel:
      tokens = jnp.broadcast_to(self.mask_embed, (b, n, self.d_model))
    else:
      tokens = jnp.take(self.voc_embed, input_seq, axis=0)
    x = jnp.concatenate([self.det_embed[task_id][:, None], tokens], axis=1)
    x = x + self.dec_embed[task_id, :n + 1]
    for block in self.decoder_blocks:
      x = block(x, memory, not train)
    return self.logits(x)

  def init_cache(self, memory, max_len: int) -> tuple[dict, ...]:
    """Per decoder layer: room for `max_len` self-attention keys/values, and the
    memory's cross-attention keys/values, projected here once."""
    if max_len > self.dec_length:
      raise ValueError(f"{max_len} decoder positions exceed dec_length {self.dec_length}")
    shape = (memory.shape[0], self.num_heads, max_len, self.d_model // self.num_heads)
    cache = []
    for block in self.decoder_blocks:
      k, v = block.memory_keys_values(memory)
      cache.append({"self_k": jnp.zeros(shape, k.dtype),
                    "self_v": jnp.zeros(shape, v.dtype), "memory_k": k, "memory_v": v})
    return tuple(cache)

  def decode_step(self, inputs, task_id: int, index, cache: tuple[dict, ...]):
    """Logits (B, V) at position `index` given the previous token's embedding (B, d)."""
    x = (inputs + self.dec_embed[task_id, index])[:, None]
    new_cache = []
    for block, layer_cache in zip(self.decoder_blocks, cache):
      x, layer_cache = block.step(x, layer_cache, index)
      new_cache.append(layer_cache)
    return self.logits(x[:, 0]), tuple(new_cache)
