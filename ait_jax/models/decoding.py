"""Inference of `ARTransformer`: autoregressive decoding in one compiled loop, and AiT-P.

The decoding functions take the bound transformer as their first argument, so they run
as `model.apply(variables, src, ..., method=decode_depth)` or from a parent module's
method as `decode_depth(self.transformer, src, ...)`.

Each step is one `ARTransformer.decode_step` inside a single `nn.scan`: the decoder is
traced once whatever the length. The cache holds the self-attention keys/values of
every position (fixed size, masked beyond the current one) and the memory's
cross-attention keys/values, projected once per image; the reference recomputes the
latter at every step, most of its decoding work.

Sampling is the reference's nucleus sampling over the slice of the vocabulary that the
position allows, driven by explicit keys; `top_p = 0` keeps only the best token
(greedy, no key needed).
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ait_jax.models.transformer import DEPTH_TASK, DET_TASK, INSSEG_TASK, ARTransformer


class DepthPrediction(NamedTuple):
  logits: jax.Array  # (B, L, num_depth_codes) depth-code logits of each step, unfiltered
  tokens: jax.Array  # (B, L) depth code indices, without the vocabulary offset


class ObjectPrediction(NamedTuple):
  tokens: jax.Array       # (B, L) index within the slice of each position
  scores: jax.Array       # (B, num_objects) class probability against the noise label
  mask_logits: jax.Array  # (B, num_objects, T, num_mask_codes) logits at mask positions


def nucleus_sample(key, logits, top_p: float):
  """Token indices (last axis) drawn from the top-p nucleus, as the reference does.

  Tokens are sorted by logit; a token is kept if the probability of the tokens before
  it is at most `top_p`, so the best one always is. `-inf` logits are never drawn.
  """
  if top_p <= 0:
    return jnp.argmax(logits, axis=-1)
  if key is None:
    raise ValueError(f"sampling with top_p={top_p} needs a PRNG key")
  sorted_logits, order = jax.lax.top_k(logits, logits.shape[-1])
  cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
  before = jnp.concatenate([jnp.zeros_like(cumulative[..., :1]), cumulative[..., :-1]],
                           axis=-1)
  rank = jax.random.categorical(key, jnp.where(before <= top_p, sorted_logits, -jnp.inf))
  return jnp.take_along_axis(order, rank[..., None], axis=-1)[..., 0]


def _step_keys(key, n: int, top_p: float) -> dict:
  """Scanned inputs with one key per step; none for greedy decoding."""
  if top_p <= 0:
    return {}
  if key is None:
    raise ValueError(f"sampling with top_p={top_p} needs a PRNG key")
  return {"key": jax.random.split(key, n)}


def _run_steps(model: ARTransformer, step, memory, task_id: int, xs, length: int):
  """Scans `step(model, logits, xs) -> (next inputs, ys)` over `length` positions,
  starting from the task's det_embed; returns ys stacked on axis 1 (B, length, ...)."""
  def body(mdl, carry, xs):
    inputs, cache = carry
    logits, cache = mdl.decode_step(inputs, task_id, xs["index"], cache)
    inputs, ys = step(mdl, logits, xs)
    return (inputs, cache), ys

  first = jnp.broadcast_to(model.det_embed[task_id], (memory.shape[0], model.d_model))
  scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False},
                 length=length)
  xs = {"index": jnp.arange(length), **xs}
  _, ys = scan(model, (first, model.init_cache(memory, length)), xs)
  return jax.tree.map(lambda y: jnp.swapaxes(y, 0, 1), ys)


def _soft_embedding(model: ARTransformer, codes_logits, codes: slice):
  """The probability-weighted embedding of a code slice (the soft token)."""
  return jax.nn.softmax(codes_logits, axis=-1) @ model.voc_embed[codes]


def decode_depth(model: ARTransformer, src, pred_len: int, key=None) -> DepthPrediction:
  """Depth codes of feature maps src (B, h, w, in_chans), `pred_len` of them.

  Feedback: the soft token with `soft_transformer`, else the drawn code. An AiT-P
  model (`parallel`) predicts every position in one decoder pass instead: its inputs
  do not depend on earlier predictions, so the result is the same.
  """
  codes = model.vocab.depth_codes
  if model.parallel:
    dummy = jnp.zeros((src.shape[0], pred_len - 1), jnp.int32)
    logits = model(src, dummy, DEPTH_TASK)[..., codes]
    return DepthPrediction(logits, nucleus_sample(key, logits, model.top_p))

  def step(mdl, logits, xs):
    code_logits = logits[:, codes]
    tokens = nucleus_sample(xs.get("key"), code_logits, mdl.top_p)
    if mdl.soft_transformer:
      inputs = _soft_embedding(mdl, code_logits, codes)
    else:
      inputs = jnp.take(mdl.voc_embed, tokens + codes.start, axis=0)
    return inputs, (code_logits, tokens)

  xs = _step_keys(key, pred_len, model.top_p)
  logits, tokens = _run_steps(model, step, model.encode(src), DEPTH_TASK, xs, pred_len)
  return DepthPrediction(logits, tokens)


def object_layout(model: ARTransformer, num_objects: int, mask_token_length: int):
  """Per position of the object sequence: the allowed id range [start, stop) and
  whether it is the class or a mask code (numpy, static).

  An object is 4 box bins, the class and T mask codes (the class last with
  `mask_before_label`).
  """
  v = model.vocab
  obj_len = 5 + mask_token_length
  label_pos = obj_len - 1 if model.mask_before_label else 4
  pos = np.arange(num_objects * obj_len) % obj_len
  is_label = pos == label_pos
  is_box = (pos < 4) & ~is_label
  is_mask = ~is_label & ~is_box
  start = np.select([is_box, is_label], [v.bins.start, v.class_offset], v.mask_offset)
  stop = np.select([is_box, is_label], [v.bins.stop, v.special_offset], v.depth_offset)
  return start, stop, is_label, is_mask


def decode_objects(model: ARTransformer, src, task_id: int, num_objects: int,
                   mask_token_length: int = 0, key=None) -> ObjectPrediction:
  """Detection (task 0, T = 0) or instance segmentation (task 1) sequences.

  Box positions draw from the bins, the class position from the classes and mask
  positions from the mask codes. The score of a class is its softmax probability
  against the other classes and the noise label. Feedback is the drawn token, or the
  soft token at mask positions with `soft_transformer`.
  """
  if task_id not in (DET_TASK, INSSEG_TASK):
    raise ValueError(f"object decoding is for tasks {DET_TASK} (det) and {INSSEG_TASK} "
                     f"(insseg), not {task_id}")
  if task_id == DET_TASK and mask_token_length:
    raise ValueError("detection sequences have no mask tokens")
  v = model.vocab
  start, stop, is_label, is_mask = object_layout(model, num_objects, mask_token_length)
  length = start.size
  ids = jnp.arange(v.size)
  class_or_noise = ((ids >= v.class_offset) & (ids < v.special_offset)) | (
      ids == v.noise_label)
  soft_masks = model.soft_transformer and mask_token_length > 0

  def step(mdl, logits, xs):
    allowed = (ids >= xs["start"]) & (ids < xs["stop"])
    tokens = nucleus_sample(xs.get("key"), jnp.where(allowed, logits, -jnp.inf),
                            mdl.top_p)
    class_probs = jax.nn.softmax(jnp.where(class_or_noise, logits, -jnp.inf), axis=-1)
    scores = jnp.take_along_axis(class_probs, tokens[:, None], axis=-1)[:, 0]
    mask_logits = logits[:, v.mask_codes]
    inputs = jnp.take(mdl.voc_embed, tokens, axis=0)
    if soft_masks:
      inputs = jnp.where(xs["is_mask"], _soft_embedding(mdl, mask_logits, v.mask_codes),
                         inputs)
    return inputs, (tokens - xs["start"], scores, mask_logits)

  xs = {"start": jnp.asarray(start), "stop": jnp.asarray(stop),
        "is_mask": jnp.asarray(is_mask), **_step_keys(key, length, model.top_p)}
  tokens, scores, mask_logits = _run_steps(model, step, model.encode(src), task_id, xs,
                                           length)
  b = tokens.shape[0]
  mask_logits = mask_logits[:, np.flatnonzero(is_mask)].reshape(
      b, num_objects, mask_token_length, v.num_mask_codes)
  return ObjectPrediction(tokens, scores[:, np.flatnonzero(is_label)], mask_logits)
