"""Depth estimation: VQ token targets, the training loss, and test-time prediction.

After the reference's `DepthHead` (`ait/code/model/depth/depth_head.py`) and the depth
branches of `AiT.forward_train` / `AiT.forward_test` (`ait/code/model/ait.py`).

* Targets: the frozen VQ-VAE tokenizer's codes of the depth map, moved into the depth
  slice of the shared vocabulary. The decoder reads `target_seq[:, :-1]`.
* Loss: the summed cross-entropy of the target tokens, plus (with
  `decoder_loss_weight > 0`) the scale-invariant log loss of the soft-token decode of
  the depth-code logits, weighted per target token; AiT divides the task's loss by its
  number of targets.
* Test time: the image is cut into `shift_size` square windows from left to right, each
  window is also predicted mirrored, and the windows' depth maps (the VQ-VAE decode of
  the predicted tokens, or of the soft tokens) are averaged back onto the image.

Everything here is jit-able on static shapes; the window layout is decided from the
static image shape.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ait_jax.models.ait import AiT
from ait_jax.models.vocab import Vocab
from ait_jax.models.vqvae import VQVAE

MIN_DEPTH = 1e-3  # test-time predictions are clipped to at least this (metres)


def silog_loss(pred: jnp.ndarray, target: jnp.ndarray, *, lambd: float = 0.5,
               min_pred: float | None = 1e-3) -> jnp.ndarray:
  """Scale-invariant log loss over the pixels with `target > 0`.

  `sqrt(mean(e^2) - lambd * mean(e)^2)` with `e = log(target) - log(pred)`. The depth
  head clips `pred` to `min_pred` first (the soft-token auxiliary loss); the
  reference's validation criterion does not (`min_pred=None`). Static shapes: invalid
  pixels are weighted out rather than gathered away.
  """
  if min_pred is not None:
    pred = jnp.maximum(pred, min_pred)
  valid = target > 0
  n = jnp.sum(valid)
  e = jnp.where(valid, jnp.log(jnp.where(valid, target, 1.0))
                - jnp.log(jnp.where(valid, pred, 1.0)), 0.0)
  mean_sq = jnp.sum(e * e) / n
  mean = jnp.sum(e) / n
  return jnp.sqrt(mean_sq - lambd * mean * mean)


def resize_and_pad(images, *, resizeto: int = 0, padto: int = 0):
  """The reference `AiT.resize` of a batch (B, H, W, C) before the backbone.

  `resizeto > 0`: bilinear resize to (resizeto, resizeto) as torch's `F.interpolate`
  (half-pixel centres, no antialiasing). `padto > 0`: zero padding at the bottom and
  right to (padto, padto); the joint config pads 480-px depth windows to 640.
  """
  b, h, w, c = images.shape
  if resizeto > 0:
    images = jax.image.resize(images, (b, resizeto, resizeto, c), "linear",
                              antialias=False)
    h = w = resizeto
  if padto > 0:
    if h > padto or w > padto:
      raise ValueError(f"padto={padto} is smaller than the image ({h}x{w}); the "
                       "reference would crop it")
    images = jnp.pad(images, ((0, 0), (0, padto - h), (0, padto - w), (0, 0)))
  return images


def _check_tokenizer(tokenizer: VQVAE, vocab: Vocab):
  if tokenizer.num_embeddings != vocab.num_depth_codes:
    raise ValueError(f"the depth tokenizer has {tokenizer.num_embeddings} codes, the "
                     f"vocabulary {vocab.num_depth_codes} depth codes "
                     "(num_embeddings_depth); they must agree")


def depth_targets(tokenizer: VQVAE, tokenizer_vars, depth, vocab: Vocab):
  """(B, token_length) int32 target tokens of depth maps (B, mask_size, mask_size)."""
  _check_tokenizer(tokenizer, vocab)
  codes = tokenizer.apply(tokenizer_vars, depth, method=VQVAE.encode)
  return codes.astype(jnp.int32) + vocab.depth_offset


def depth_loss(logits, target_seq, depth, tokenizer: VQVAE, tokenizer_vars, vocab: Vocab,
               *, loss_weight: float, decoder_loss_weight: float
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The depth task's training loss, normalised as AiT does, and its log values.

  logits (B, L', V) with L' >= L (positions past the targets, e.g. from padding the
  multi-task batch, are dropped as the reference does); target_seq (B, L) from
  `depth_targets`, -100 ignored; depth (B, mask_size, mask_size) metres, 0 = invalid.
  `decoder_loss_weight` is a Python number (it selects whether the auxiliary loss is
  computed at all).

  With n the number of targets (> -1) and CE their summed cross-entropy,
  `loss = (CE + aux * decoder_loss_weight * n) * loss_weight / n`, where `aux` is
  `silog_loss` of `tokenizer.decode_soft` of the depth-code logits. Metrics:
  'depth_ce' = CE / n and 'depth_decoder_aux_ce' = aux. The SiLog statistics are over
  the whole batch given here; the reference computed them per GPU.
  """
  _check_tokenizer(tokenizer, vocab)
  length = target_seq.shape[1]
  if length != tokenizer.token_length:
    raise ValueError(f"depth targets have {length} tokens, the tokenizer "
                     f"{tokenizer.token_length}")
  if logits.shape[1] < length:
    raise ValueError(f"{logits.shape[1]} logits positions for {length} targets")
  logits = logits[:, :length].astype(jnp.float32)
  valid = target_seq > -1
  n = jnp.sum(valid)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, jnp.where(valid, target_seq, 0)[..., None],
                               axis=-1)[..., 0]
  ce_sum = -jnp.sum(jnp.where(valid, picked, 0.0))
  if decoder_loss_weight > 0:
    soft_depth = tokenizer.apply(tokenizer_vars, logits[..., vocab.depth_codes],
                                 method=VQVAE.decode_soft)
    aux = silog_loss(soft_depth, depth.astype(jnp.float32))
  else:
    aux = jnp.zeros((), jnp.float32)
  count = jnp.maximum(n, 1)
  loss = (ce_sum + aux * decoder_loss_weight * n) * loss_weight / count
  return loss, {"depth_ce": ce_sum / count, "depth_decoder_aux_ce": aux}


def window_starts(height: int, width: int, *, shift_window_test: bool,
                  shift_size: int) -> tuple[int, ...]:
  """Left columns of the square test windows of an image (static).

  The reference's windows are `img[..., s : s + height]` for `s = i * interval`,
  `interval = (width - height) // (shift_size - 1)`. A square image is one window
  (the reference would predict it `shift_size` times and average identical maps).
  Layouts the reference cannot average (uncovered columns, no windows) are errors.
  """
  if width == height:
    return (0,)
  if not shift_window_test:
    raise ValueError(f"a {height}x{width} image needs shift_window_test: without it the "
                     "prediction is one square map, and only square images fit")
  if width < height:
    raise ValueError(f"test windows are height x height squares slid along the width; "
                     f"a {height}x{width} image is taller than wide")
  if shift_size < 2:
    raise ValueError(f"shift_size={shift_size}: a {height}x{width} image needs at least "
                     "2 windows")
  if (width - height) % (shift_size - 1):
    raise ValueError(f"shift_size={shift_size} windows of {height} px leave columns of a "
                     f"{width}-px-wide image uncovered: (width - height) = "
                     f"{width - height} must be a multiple of shift_size - 1")
  interval = (width - height) // (shift_size - 1)
  return tuple(i * interval for i in range(shift_size))


def window_images(images, starts: tuple[int, ...], *, flip_test: bool):
  """(B, H, W, C) -> the window batch (n*B [*2], H, H, C), window-major.

  Order as the reference: window 0 of every image, window 1, ..., then (with
  `flip_test`) all of those mirrored left-right.
  """
  h = images.shape[1]
  windows = jnp.concatenate([images[:, :, s:s + h] for s in starts], axis=0)
  if flip_test:
    windows = jnp.concatenate([windows, windows[:, :, ::-1]], axis=0)
  return windows


def merge_window_depths(depths, starts: tuple[int, ...], width: int, *, flip_test: bool):
  """Window predictions (as `window_images` orders them, (N, H, H)) -> (B, H, W).

  A window's mirrored prediction is flipped back and averaged with it; windows are
  summed onto the image and divided by the number covering each column; the result is
  clipped to >= MIN_DEPTH.
  """
  if flip_test:
    half = depths.shape[0] // 2
    depths = (depths[:half] + depths[half:, :, ::-1]) / 2.0
  b = depths.shape[0] // len(starts)
  h = depths.shape[1]
  total = jnp.zeros((b, h, width), depths.dtype)
  count = np.zeros((width,), np.float32)
  for i, s in enumerate(starts):
    total = total.at[:, :, s:s + h].add(depths[i * b:(i + 1) * b])
    count[s:s + h] += 1
  return jnp.maximum(total / count, MIN_DEPTH)


def predict_depth(model: AiT, model_vars, tokenizer: VQVAE, tokenizer_vars, images, *,
                  token_length: int, soft: bool, shift_window_test: bool,
                  shift_size: int, flip_test: bool, key=None, resizeto: int = 0,
                  padto: int = 0) -> jax.Array:
  """Depth in metres (B, H, W) of images (B, H, W, 3), as the reference tests.

  The height must be the tokenizer's `mask_size` (its decoded maps are that square).
  Each window (and its mirror with `flip_test`) is resized/padded as AiT does
  (`resizeto`, `padto`: the config's top-level keys), decoded into `token_length`
  depth tokens, and turned into a map by `decode_soft` of the depth-code logits
  (`soft`, at the tokenizer's `tau`) or `decode` of the tokens. `key` drives the
  sampling when the transformer's `top_p > 0`.
  """
  _, h, w, _ = images.shape
  if h != tokenizer.mask_size:
    raise ValueError(f"images are {h} px high, but the depth tokenizer decodes "
                     f"{tokenizer.mask_size}x{tokenizer.mask_size} maps; they must agree")
  if token_length != tokenizer.token_length:
    raise ValueError(f"token_length={token_length}, but the depth tokenizer has "
                     f"{tokenizer.token_length} tokens")
  _check_tokenizer(tokenizer, model.transformer.vocab)
  starts = window_starts(h, w, shift_window_test=shift_window_test,
                         shift_size=shift_size)
  windows = resize_and_pad(window_images(images, starts, flip_test=flip_test),
                           resizeto=resizeto, padto=padto)
  pred = model.apply(model_vars, windows, token_length, key, method=AiT.decode_depth)
  if soft:
    depths = tokenizer.apply(tokenizer_vars, pred.logits, method=VQVAE.decode_soft)
  else:
    depths = tokenizer.apply(tokenizer_vars, pred.tokens, method=VQVAE.decode)
  return merge_window_depths(depths, starts, w, flip_test=flip_test)
