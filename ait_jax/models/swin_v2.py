"""SwinV2 backbone of AiT, equal to the reference's `SwinV2TransformerRPE2FC`.

Post-norm blocks with scaled cosine attention inside (shifted) windows, a relative
position bias computed by a small MLP from log-spaced offsets, and patch merging between
stages. Input: NHWC images of any size (padded as the reference pads); output: the NHWC
float32 maps of the stages in `out_indices`, each after its own LayerNorm.

Debug values are sown into the 'intermediates' collection: `patch_embed/out`,
`layers_i/blocks_j/out`, `layers_i/blocks_j/attn/relative_position_bias` and
`layers_i/downsample/out`.
"""

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ait_jax.models import axes
from ait_jax.models import swin_v2_tables as tables

LN_EPS = 1e-6
COSINE_EPS = 5e-5         # added to the L2 norm of q and k, not a floor
MAX_LOGIT_SCALE = math.log(100.0)
RPE_BIAS_SCALE = 16.0     # bias = 16 * sigmoid(rpe_mlp(table))
SHIFT_MASK_VALUE = -100.0


def _dense_init(names):
  return nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), names)


def _zeros(names):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _layer_norm(x, name: str, out_dtype):
  """The reference's LayerNormFP32 (eps 1e-6, two-pass variance), cast to `out_dtype`."""
  norm = nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, use_fast_variance=False,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                              (axes.EMBED,)),
                      bias_init=_zeros((axes.EMBED,)), name=name)
  return norm(x.astype(jnp.float32)).astype(out_dtype)


def _shift_mask(padded_hw, window: int, shift: int):
  """(num_windows, N, N) additive mask: -100 between tokens of different regions."""
  ids = jnp.asarray(tables.shift_region_ids(padded_hw, window, shift))
  return jnp.where(ids[:, :, None] != ids[:, None, :], SHIFT_MASK_VALUE, 0.0)


def _cosine_unit(t):
  """t / (|t| + 5e-5) in float32, with a zero (not NaN) gradient at t = 0.

  Padded tokens have zero keys; torch's norm gives them a zero gradient too.
  """
  t = t.astype(jnp.float32)
  sq = jnp.sum(t * t, axis=-1, keepdims=True)
  norm = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
  return t / (norm + COSINE_EPS)


class PatchEmbed(nn.Module):
  """Zero-pad right/bottom to a multiple of the patch, patchify conv, LayerNorm."""
  patch_size: int
  embed_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    p = self.patch_size
    _, h, w, _ = images.shape
    x = jnp.pad(images, ((0, 0), (0, -h % p), (0, -w % p), (0, 0)))
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID",
                dtype=self.dtype, name="proj",
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                    (axes.CONV_H, axes.CONV_W, axes.CONV_IN, axes.EMBED)),
                bias_init=_zeros((axes.EMBED,)))(x.astype(self.dtype))
    x = _layer_norm(x, "norm", self.dtype)
    self.sow("intermediates", "out", x)
    return x


class WindowAttention(nn.Module):
  """Scaled cosine attention within windows, with the MLP relative position bias."""
  num_heads: int
  window: int
  pretrain_window: int
  rpe_hidden_dim: int = 512
  dtype: jnp.dtype = jnp.float32

  def _relative_position_bias(self):
    """(heads, N, N) = 16 * sigmoid(rpe_mlp(coords_table)[index]), in float32."""
    coords = jnp.asarray(tables.relative_coords_table(self.window, self.pretrain_window))
    hidden = nn.Dense(self.rpe_hidden_dim, dtype=jnp.float32, name="rpe_hidden",
                      kernel_init=_dense_init((axes.RPE_COORD, axes.RPE_HIDDEN)),
                      bias_init=_zeros((axes.RPE_HIDDEN,)))(coords.reshape(-1, 2))
    per_offset = nn.Dense(self.num_heads, use_bias=False, dtype=jnp.float32,
                          name="rpe_out",
                          kernel_init=_dense_init((axes.RPE_HIDDEN, axes.HEADS)))(
                              nn.relu(hidden))
    bias = per_offset[tables.relative_position_index(self.window, xp=jnp)]
    bias = RPE_BIAS_SCALE * jax.nn.sigmoid(bias.transpose(2, 0, 1))
    self.sow("intermediates", "relative_position_bias", bias)
    return bias

  @nn.compact
  def __call__(self, windows, mask=None):
    """windows: (B, num_windows, N, C); mask: (num_windows, N, N) or None."""
    b, nw, n, c = windows.shape
    heads = self.num_heads
    q_bias = self.param("q_bias", _zeros((axes.HEADS,)), (c,))
    v_bias = self.param("v_bias", _zeros((axes.HEADS,)), (c,))
    logit_scale = self.param(
        "logit_scale",
        nn.with_logical_partitioning(nn.initializers.constant(math.log(10.0)),
                                     (axes.HEADS,)), (heads,))
    qkv = nn.Dense(3 * c, use_bias=False, dtype=self.dtype, name="qkv",
                   kernel_init=_dense_init((axes.EMBED, axes.QKV)))(windows)
    # The reference has no key bias: its qkv bias is [q_bias, 0, v_bias].
    qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
    qkv = qkv.reshape(b, nw, n, 3, heads, c // heads)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]

    logits = jnp.einsum("bwqhd,bwkhd->bwhqk", _cosine_unit(q), _cosine_unit(k))
    logits = logits * jnp.exp(jnp.minimum(logit_scale, MAX_LOGIT_SCALE))[:, None, None]
    logits = logits + self._relative_position_bias()
    if mask is not None:
      logits = logits + mask[None, :, None]
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bwhqk,bwkhd->bwqhd", probs, v).reshape(b, nw, n, c)
    return nn.Dense(c, dtype=self.dtype, name="proj",
                    kernel_init=_dense_init((axes.HEADS, axes.EMBED)),
                    bias_init=_zeros((axes.EMBED,)))(out)


class Mlp(nn.Module):
  hidden_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, name="fc1",
                 kernel_init=_dense_init((axes.EMBED, axes.MLP)),
                 bias_init=_zeros((axes.MLP,)))(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(c, dtype=self.dtype, name="fc2",
                    kernel_init=_dense_init((axes.MLP, axes.EMBED)),
                    bias_init=_zeros((axes.EMBED,)))(x)


class SwinV2Block(nn.Module):
  """Post-norm block: x + LN1(W-MSA(x)), then x + LN2(MLP(x)), with stochastic depth.

  The map is zero-padded to whole windows before the cyclic shift; padded tokens take
  part in the attention (unmasked, as in the reference) and are cropped afterwards.
  """
  num_heads: int
  window: int
  pretrain_window: int
  shift: int
  mlp_ratio: float = 4.0
  rpe_hidden_dim: int = 512
  drop_path: float = 0.0
  dtype: jnp.dtype = jnp.float32

  def _drop_path(self, y, deterministic: bool):
    """timm's DropPath: zero whole samples with probability `drop_path`, rescale."""
    if deterministic or self.drop_path == 0.0:
      return y
    keep = 1.0 - self.drop_path
    shape = (y.shape[0],) + (1,) * (y.ndim - 1)
    kept = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(kept, y / keep, 0.0).astype(y.dtype)

  def _window_attention(self, x):
    _, h, w, _ = x.shape
    ws, s = self.window, self.shift
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    if s:
      x = jnp.roll(x, (-s, -s), axis=(1, 2))
    mask = _shift_mask((hp, wp), ws, s) if s else None
    y = WindowAttention(self.num_heads, ws, self.pretrain_window, self.rpe_hidden_dim,
                        self.dtype, name="attn")(tables.window_partition(x, ws), mask)
    y = tables.window_merge(y, ws, (hp, wp))
    if s:
      y = jnp.roll(y, (s, s), axis=(1, 2))
    return y[:, :h, :w]

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    """x: (B, H, W, C) -> (B, H, W, C)."""
    y = _layer_norm(self._window_attention(x), "norm1", x.dtype)
    x = x + self._drop_path(y, deterministic)
    y = Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, name="mlp")(x)
    x = x + self._drop_path(_layer_norm(y, "norm2", x.dtype), deterministic)
    self.sow("intermediates", "out", x)
    return x


class PatchMerging(nn.Module):
  """2x2 neighbours -> channels (odd sides zero-padded), Linear(4C -> 2C), LayerNorm."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    _, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    # The reference's order: (even row, even col), (odd, even), (even, odd), (odd, odd).
    x = jnp.concatenate(
        [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    # The 4C input is a 2x2 patch's channels, as a patchify conv's input.
    x = nn.Dense(2 * c, use_bias=False, dtype=self.dtype, name="reduction",
                 kernel_init=_dense_init((axes.CONV_IN, axes.EMBED)))(x)
    x = _layer_norm(x, "norm", self.dtype)
    self.sow("intermediates", "out", x)
    return x


class SwinV2Stage(nn.Module):
  """The blocks of one resolution, then (except in the last stage) patch merging.

  Returns (stage output before merging, input of the next stage).
  """
  depth: int
  num_heads: int
  window: int
  pretrain_window: int
  use_shift: bool
  drop_path_rates: tuple[float, ...]
  downsample: bool
  mlp_ratio: float = 4.0
  rpe_hidden_dim: int = 512
  remat: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    block_cls = nn.remat(SwinV2Block, static_argnums=(2,)) if self.remat else SwinV2Block
    for j in range(self.depth):
      # Odd blocks of a shifting stage roll by half a window, even when the map is no
      # larger than one window (the reference never switches shifting off).
      shift = self.window // 2 if self.use_shift and j % 2 == 1 else 0
      x = block_cls(self.num_heads, self.window, self.pretrain_window, shift,
                    self.mlp_ratio, self.rpe_hidden_dim, self.drop_path_rates[j],
                    self.dtype, name=f"blocks_{j}")(x, deterministic)
    if not self.downsample:
      return x, x
    return x, PatchMerging(self.dtype, name="downsample")(x)


class SwinV2(nn.Module):
  """The SwinV2 encoder; defaults are the reference class defaults.

  `pretrain_window_sizes` scale the position-offset table per stage (the reference
  divides offsets by `pretrain_window_size - 1`, even for its default of -1).
  `drop_path_rate` grows linearly from 0 over all blocks; it needs a 'dropout' rng when
  `train` is set. `remat` recomputes each block in the backward pass. `dtype` is the
  compute dtype; attention logits, LayerNorms, the RPE MLP and the outputs stay float32.
  """
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_sizes: Sequence[int] = (7, 7, 7, 7)
  pretrain_window_sizes: Sequence[int] = (-1, -1, -1, -1)
  shifts: Sequence[bool] = (True, True, True, True)
  out_indices: Sequence[int] = (0, 1, 2, 3)
  drop_path_rate: float = 0.1
  patch_size: int = 4
  in_chans: int = 3
  mlp_ratio: float = 4.0
  rpe_hidden_dim: int = 512
  remat: bool = False
  dtype: jnp.dtype = jnp.float32

  def _check_config(self):
    n = len(self.depths)
    for field in ("num_heads", "window_sizes", "pretrain_window_sizes", "shifts"):
      if len(getattr(self, field)) != n:
        raise ValueError(f"SwinV2.{field} has {len(getattr(self, field))} entries, "
                         f"but depths has {n} stages")
    for i, heads in enumerate(self.num_heads):
      if (self.embed_dim * 2**i) % heads:
        raise ValueError(f"SwinV2 stage {i}: width {self.embed_dim * 2**i} is not "
                         f"divisible by num_heads {heads}")
    if any(not 0 <= i < n for i in self.out_indices):
      raise ValueError(f"SwinV2.out_indices {tuple(self.out_indices)} must lie in "
                       f"[0, {n})")

  def stage_dims(self) -> list[int]:
    return [self.embed_dim * 2**i for i in range(len(self.depths))]

  @nn.compact
  def __call__(self, images, *, train: bool = False) -> list[jax.Array]:
    """images: (B, H, W, in_chans) -> [(B, h_i, w_i, C_i) for i in out_indices]."""
    self._check_config()
    if images.shape[-1] != self.in_chans:
      raise ValueError(f"SwinV2 expects NHWC images with {self.in_chans} channels, "
                       f"got shape {images.shape}")
    x = PatchEmbed(self.patch_size, self.embed_dim, self.dtype, name="patch_embed")(images)
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
    outs = []
    for i, depth in enumerate(self.depths):
      start = sum(self.depths[:i])
      stage_out, x = SwinV2Stage(
          depth, self.num_heads[i], self.window_sizes[i], self.pretrain_window_sizes[i],
          bool(self.shifts[i]), tuple(float(r) for r in rates[start:start + depth]),
          downsample=i < len(self.depths) - 1, mlp_ratio=self.mlp_ratio,
          rpe_hidden_dim=self.rpe_hidden_dim, remat=self.remat, dtype=self.dtype,
          name=f"layers_{i}")(x, not train)
      if i in self.out_indices:
        outs.append(_layer_norm(stage_out, f"norm{i}", jnp.float32))
    return outs


_AIT_SETTINGS = dict(depths=(2, 2, 18, 2), window_sizes=(30, 30, 30, 15),
                     pretrain_window_sizes=(12, 12, 12, 6),
                     shifts=(True, True, False, False), drop_path_rate=0.1,
                     out_indices=(3,))


def swin_v2_base(**overrides) -> SwinV2:
  """SwinV2-B as AiT's 480-resolution depth configs use it.

  The 640-resolution detection / instance segmentation configs pass
  `shifts=(True,) * 4, drop_path_rate=0.3`.
  """
  return SwinV2(**{**_AIT_SETTINGS, "embed_dim": 128, "num_heads": (4, 8, 16, 32),
                   **overrides})


def swin_v2_large(**overrides) -> SwinV2:
  """SwinV2-L as AiT's `swinv2l_480reso_*` configs use it."""
  return SwinV2(**{**_AIT_SETTINGS, "embed_dim": 192, "num_heads": (6, 12, 24, 48),
                   **overrides})
