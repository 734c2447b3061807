"""AiT's VQ-VAE tokenizer: a conv auto-encoder with an EMA codebook.

One module serves both reference classes, which share a state_dict layout: the frozen
tokenizer inside AiT (`encode`, `decode`, `decode_soft`) and the stage-1 training model
(`__call__` with a masked input and a whole target, EMA codebook updates with
`train=True`).

Sizes follow AiT's keywords. The token grid is `g = sqrt(token_length)`, the downsample
ratio `ds = mask_size // g` (a power of two), and `hidden_dim` is the decoder's width
(AiT's `hidden_dim`): the encoder starts at `hidden_dim // (ds // 2)` channels (the
training model's `hidden_dim`) and doubles them at each of its `log2(ds)` stride-2 convs.

The codebook (`embedding`, K x D) and its EMA statistics (`ema_cluster_size`, `ema_w`)
are variables of the non-trainable collection 'vq' (in the `quantizer` scope); they
change only through the EMA update, so callers pass `mutable=['vq']` with `train=True`.
Maps are NHWC inside; the public methods take and return single-channel maps (B, H, W).
"""

import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ait_jax.models import axes

LOSS_TYPES = ("mse", "mse_ignore_zero")


def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _conv(x, features: int, kernel: int, stride: int, padding: int, name: str, dtype):
  """A torch-initialised Conv2d (U(+-1/sqrt(fan_in)) for kernel and bias) applied to x."""
  fan_in = x.shape[-1] * kernel * kernel
  conv = nn.Conv(
      features, (kernel, kernel), strides=stride,
      padding=((padding, padding), (padding, padding)), dtype=dtype,
      param_dtype=jnp.float32, name=name,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
          (axes.CONV_H, axes.CONV_W, axes.CONV_IN, axes.CONV_OUT)),
      bias_init=nn.with_logical_partitioning(
          _uniform(fan_in ** -0.5), (axes.CONV_OUT,)))
  return conv(x)


def _upsample(x, features: int, name: str, dtype):
  """torch ConvTranspose2d(kernel 4, stride 2, padding 1): doubles H and W.

  Flax convolves the stride-dilated input, padded by kernel - 1 - padding = 2 on each
  side, with the kernel as stored (transpose_kernel=False), i.e. torch's kernel flipped
  in space (the checkpoint layout 'conv_transpose'). torch initialises it with fan_in =
  out_channels * 16, hence in_axis=-1.
  """
  fan_in = features * 16
  conv = nn.ConvTranspose(
      features, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)),
      transpose_kernel=False, dtype=dtype, param_dtype=jnp.float32, name=name,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=-1,
                                           out_axis=-2),
          (axes.CONV_H, axes.CONV_W, axes.CONV_IN, axes.CONV_OUT)),
      bias_init=nn.with_logical_partitioning(
          _uniform(fan_in ** -0.5), (axes.CONV_OUT,)))
  return conv(x)


class ResBlock(nn.Module):
  """`x + conv1x1(relu(conv3x3(relu(conv3x3(x)))))`, no activation after the sum."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    y = nn.relu(_conv(x, width, 3, 1, 1, "conv_0", self.dtype))
    y = nn.relu(_conv(y, width, 3, 1, 1, "conv_1", self.dtype))
    return x + _conv(y, width, 1, 1, 0, "conv_2", self.dtype)


class Encoder(nn.Module):
  """(B, H, W, 1) -> (B, H/ds, W/ds, embedding_dim) by `num_downsamples` 4x4/2 convs.

  The first conv has `first_width` channels; each later one doubles them.
  """
  first_width: int
  num_downsamples: int
  num_resnet_blocks: int
  embedding_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_downsamples):
      x = nn.relu(_conv(x, self.first_width * 2 ** i, 4, 2, 1, f"down_{i}", self.dtype))
    for i in range(self.num_resnet_blocks):
      x = ResBlock(self.dtype, name=f"res_{i}")(x)
    return _conv(x, self.embedding_dim, 1, 1, 0, "to_codes", self.dtype)


class Decoder(nn.Module):
  """(B, h, w, D) -> (B, h*ds, w*ds).

  The first upsampling keeps `width` channels; each later one halves them.
  """
  width: int
  num_upsamples: int
  num_resnet_blocks: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(_conv(x, self.width, 1, 1, 0, "from_codes", self.dtype))
    for i in range(self.num_resnet_blocks):
      x = ResBlock(self.dtype, name=f"res_{i}")(x)
    for i in range(self.num_upsamples):
      features = self.width if i == 0 else x.shape[-1] // 2
      x = nn.relu(_upsample(x, features, f"up_{i}", self.dtype))
    return _conv(x, 1, 1, 1, 0, "to_pixels", self.dtype)[..., 0]


class EMAVectorQuantizer(nn.Module):
  """Nearest-code quantisation with an EMA-updated codebook (variables in 'vq').

  The codebook is a buffer, not a parameter: it receives no gradient, and the encoder
  learns through the straight-through estimator plus the commitment loss. Distances and
  EMA statistics are computed in float32 at full matmul precision (token ids are
  discrete, so they must not depend on the accelerator's default precision).
  """
  num_embeddings: int
  embedding_dim: int
  commitment_cost: float = 0.25
  decay: float = 0.99
  epsilon: float = 1e-5

  def setup(self):
    k, d = self.num_embeddings, self.embedding_dim
    rows = (axes.CODEBOOK, axes.EMBED)
    # The reference initialises both matrices N(0, 1), independently, and the counts to 0.
    self.embedding = self.variable("vq", "embedding", nn.with_logical_partitioning(
        lambda: jax.random.normal(self.make_rng("params"), (k, d)), rows))
    self.ema_cluster_size = self.variable(
        "vq", "ema_cluster_size", nn.with_logical_partitioning(
            lambda: jnp.zeros((k,), jnp.float32), (axes.CODEBOOK,)))
    self.ema_w = self.variable("vq", "ema_w", nn.with_logical_partitioning(
        lambda: jax.random.normal(self.make_rng("params"), (k, d)), rows))

  def nearest(self, z):
    """Code ids (int32, z.shape[:-1]) of the nearest codebook rows; ties go to the first."""
    flat = z.reshape(-1, self.embedding_dim).astype(jnp.float32)
    codebook = self.embedding.value
    dist = (jnp.sum(flat ** 2, axis=1, keepdims=True) + jnp.sum(codebook ** 2, axis=1)
            - 2 * jnp.matmul(flat, codebook.T, precision=jax.lax.Precision.HIGHEST))
    return jnp.argmin(dist, axis=1).astype(jnp.int32).reshape(z.shape[:-1])

  def lookup(self, ids):
    """Codebook rows of integer code ids: (...) -> (..., D)."""
    return jnp.take(self.embedding.value, ids, axis=0)

  def soft_lookup(self, weights):
    """Weighted sums of codebook rows; `weights` (..., K)."""
    return jnp.matmul(weights, self.embedding.value)

  def __call__(self, z, train: bool = False):
    """Returns (straight-through codes, code ids, commitment loss) for features z (..., D).

    With `train`, the codebook is updated after quantising with the old one, as the
    reference does. Under `jit` with a sharded batch the counts and sums are global;
    the reference (DDP without buffer broadcast) kept per-GPU statistics.
    """
    z = z.astype(jnp.float32)
    ids = self.nearest(z)
    quantized = self.lookup(ids)
    vq_loss = self.commitment_cost * jnp.mean((jax.lax.stop_gradient(quantized) - z) ** 2)
    if train and not self.is_initializing():
      self._ema_update(z, ids)
    # Straight-through: the value of the reference's `z + (q - z)` (not exactly q in
    # float32), the gradient of z.
    return z + jax.lax.stop_gradient(quantized - z), ids, vq_loss

  def _ema_update(self, z, ids):
    k = self.num_embeddings
    flat = jax.lax.stop_gradient(z).reshape(-1, self.embedding_dim)
    onehot = jax.nn.one_hot(ids.reshape(-1), k, dtype=jnp.float32)
    cluster = (self.ema_cluster_size.value * self.decay
               + (1 - self.decay) * jnp.sum(onehot, axis=0))
    n = jnp.sum(cluster)
    # Laplace smoothing keeps unused codes from dividing by zero.
    cluster = (cluster + self.epsilon) / (n + k * self.epsilon) * n
    dw = jnp.matmul(onehot.T, flat, precision=jax.lax.Precision.HIGHEST)
    ema_w = self.ema_w.value * self.decay + (1 - self.decay) * dw
    self.ema_cluster_size.value = cluster
    self.ema_w.value = ema_w
    self.embedding.value = ema_w / cluster[:, None]


@flax.struct.dataclass
class VQVAEOutput:
  """What the training forward returns. `out` is de-normalised like `decode`'s output."""
  total_loss: jax.Array   # recon_loss + vq_loss
  recon_loss: jax.Array
  vq_loss: jax.Array      # commitment_cost * mse(codes, encoder features)
  out: jax.Array          # (B, H, W)
  tokens: jax.Array       # (B, token_length) int32, row-major


class VQVAE(nn.Module):
  """AiT's VQ-VAE (both reference classes). See the module docstring for the sizes.

  `loss_type` is the reconstruction loss of `__call__`: 'mse', or 'mse_ignore_zero'
  (the depth tokenizer's: mean squared error over pixels whose target is > 0, the
  target being normalised first when `use_norm`; NaN when no pixel is, as in the
  reference). `use_norm` maps inputs by
  `2 * (x / max_value - 0.5)` and outputs back. `tau` is `decode_soft`'s default
  logit scale. `dtype` is the conv compute dtype; quantisation and losses stay float32.
  """
  mask_size: int
  token_length: int
  embedding_dim: int
  hidden_dim: int
  num_embeddings: int
  num_resnet_blocks: int = 2
  use_norm: bool = True
  max_value: float = 1.0
  commitment_cost: float = 0.25
  decay: float = 0.99
  epsilon: float = 1e-5
  loss_type: str = "mse"
  tau: float = 1.0
  dtype: Any = jnp.float32

  @property
  def grid_size(self) -> int:
    g = math.isqrt(self.token_length)
    if g * g != self.token_length:
      raise ValueError(f"VQVAE: token_length {self.token_length} is not a square")
    return g

  @property
  def downsample_ratio(self) -> int:
    ds = self.mask_size // self.grid_size
    if ds < 2 or ds & (ds - 1) or ds * self.grid_size != self.mask_size:
      raise ValueError(
          f"VQVAE: mask_size {self.mask_size} must be a power of two >= 2 times the token "
          f"grid side {self.grid_size} (token_length {self.token_length})")
    return ds

  @property
  def num_downsamples(self) -> int:
    """Stride-2 convs in the encoder (and ConvTranspose layers in the decoder)."""
    return self.downsample_ratio.bit_length() - 1

  @property
  def encoder_width(self) -> int:
    """Channels of the first conv (the training model's `hidden_dim`)."""
    width = self.hidden_dim // (self.downsample_ratio // 2)
    if width < 1:
      raise ValueError(f"VQVAE: hidden_dim {self.hidden_dim} is smaller than "
                       f"downsample_ratio // 2 = {self.downsample_ratio // 2}")
    return width

  @property
  def decoder_width(self) -> int:
    """Encoder's last width = decoder's first width (== hidden_dim when divisible)."""
    return self.encoder_width * self.downsample_ratio // 2

  def setup(self):
    if self.loss_type not in LOSS_TYPES:
      raise ValueError(f"VQVAE: loss_type {self.loss_type!r} is not one of {LOSS_TYPES}")
    self.encoder = Encoder(self.encoder_width, self.num_downsamples,
                           self.num_resnet_blocks, self.embedding_dim, self.dtype)
    self.decoder = Decoder(self.decoder_width, self.num_downsamples,
                           self.num_resnet_blocks, self.dtype)
    self.quantizer = EMAVectorQuantizer(self.num_embeddings, self.embedding_dim,
                                        self.commitment_cost, self.decay, self.epsilon)

  def _normalize(self, x, what: str):
    if x.shape[1:] != (self.mask_size, self.mask_size):
      raise ValueError(f"VQVAE: {what} must be (B, {self.mask_size}, {self.mask_size}), "
                       f"got {x.shape}")
    x = x.astype(jnp.float32)
    return 2.0 * (x / self.max_value - 0.5) if self.use_norm else x

  def _denormalize(self, x):
    return (x * 0.5 + 0.5) * self.max_value if self.use_norm else x

  def _features(self, x):
    return self.encoder(x[..., None]).astype(jnp.float32)

  def _decode_codes(self, codes):
    """Code vectors (B, token_length, D) or (B, h, w, D) -> (B, H, W) float32 maps.

    The maps are in the normalised scale (before `_denormalize`).
    """
    g = self.grid_size
    codes = codes.reshape(codes.shape[0], g, g, self.embedding_dim)
    return self.decoder(codes).astype(jnp.float32)

  def encode(self, x):
    """(B, H, W) maps -> (B, token_length) int32 code ids, row-major over the grid."""
    ids = self.quantizer.nearest(self._features(self._normalize(x, "input")))
    return ids.reshape(x.shape[0], self.token_length)

  def decode(self, tokens):
    """(B, token_length) code ids -> (B, H, W) maps."""
    return self._denormalize(self._decode_codes(self.quantizer.lookup(tokens)))

  def decode_soft(self, logits, tau: float | None = None):
    """(B, token_length, K) code logits -> (B, H, W) maps, from soft tokens.

    The decoder reads `softmax(logits * tau)`-weighted sums of codebook rows. The
    reference takes (B, K, h, w); this takes its row-major transpose (B, h*w, K), the
    layout of the transformer's logits ((B, h, w, K) works too).
    """
    tau = self.tau if tau is None else tau
    weights = jax.nn.softmax(logits.astype(jnp.float32) * tau, axis=-1)
    return self._denormalize(self._decode_codes(self.quantizer.soft_lookup(weights)))

  def __call__(self, x, label=None, train: bool = False) -> VQVAEOutput:
    """The training forward: encode `x` (B, H, W), reconstruct `label` (default: x).

    With `train=True` the EMA codebook is updated (pass `mutable=['vq']`); the losses
    and outputs use the codebook from before the update.
    """
    inputs = self._normalize(x, "input")
    target = inputs if label is None else self._normalize(label, "label")
    codes, ids, vq_loss = self.quantizer(self._features(inputs), train=train)
    out = self._decode_codes(codes)
    if self.loss_type == "mse":
      recon_loss = jnp.mean((out - target) ** 2)
    else:
      valid = target > 0
      recon_loss = (jnp.sum(jnp.where(valid, (target - out) ** 2, 0.0))
                    / jnp.sum(valid))
    return VQVAEOutput(total_loss=recon_loss + vq_loss, recon_loss=recon_loss,
                       vq_loss=vq_loss, out=self._denormalize(out),
                       tokens=ids.reshape(x.shape[0], self.token_length))
