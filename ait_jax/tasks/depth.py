"""Depth estimation: losses on depth maps."""

import jax.numpy as jnp


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
