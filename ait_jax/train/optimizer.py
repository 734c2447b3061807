"""The reference's optimizers and learning-rate schedules in optax.

AiT (stage 2): AdamW with SwinLayerDecayOptimizerConstructor's per-parameter learning
rate scale and weight-decay exclusions (ait/code/model/optimizer.py), gradient clipping
by global norm, and mmcv's Step or LinearAnnealing policies with linear warmup. The
VQ-VAEs (stage 1): Adam / AdamW with the exponential or timm-cosine schedules of
vae/train_*_vqvae_dist.py.

Layer ids are computed on Flax paths of the trainable parameters (`backbone/...`,
`transformer/...`), with the reference's rules:
* `backbone/patch_embed/*` is layer 0;
* `backbone/layers_s/blocks_b/*` is `b + sum(lps[:s]) + 1`, and
  `backbone/layers_s/downsample/*` is `sum(lps[:s+1])`, where `lps` are the stage
  depths plus one for each patch merging (all stages but the last);
* everything else (the backbone's output norms, the transformer) is the last layer,
  `num_layers - 1` with `num_layers = sum(lps) + 2`;
and `lr_scale = rate ** (num_layers - 1 - layer_id)`. No weight decay on 1-D
parameters, biases, and names containing one of `no_decay_names` (the reference's
names; `rpe_mlp` is `rpe_hidden` / `rpe_out` here).
"""

import math
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

# Reference parameter-name fragments -> the Flax names of the same parameters.
_FLAX_NAMES = {"rpe_mlp": ("rpe_hidden", "rpe_out")}
SCHEDULES = ("constant", "step", "linear_annealing", "exp", "cosine")


def _key(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", k)))


def layers_per_stage(depths: Sequence[int]) -> list[int]:
  """Stage depths with one more layer for each patch merging (all but the last)."""
  return [int(d) + (1 if i < len(depths) - 1 else 0) for i, d in enumerate(depths)]


def layer_id(path: Sequence[str], depths: Sequence[int]) -> int:
  """The reference's layer id of the parameter at Flax `path` (params root)."""
  lps = layers_per_stage(depths)
  last = sum(lps) + 1
  if len(path) < 2 or path[0] != "backbone":
    return last
  if path[1] == "patch_embed":
    return 0
  stage = re.fullmatch(r"layers_(\d+)", path[1])
  if stage and len(path) > 2:
    s = int(stage.group(1))
    block = re.fullmatch(r"blocks_(\d+)", path[2])
    if block:
      return int(block.group(1)) + sum(lps[:s]) + 1
    if path[2] == "downsample":
      return sum(lps[:s + 1])
  return last


def lr_scales(params, depths: Sequence[int] | None, rate: float):
  """Per-leaf learning-rate scale (a tree like `params`); 1 without layer decay."""
  if not depths or rate == 1.0:
    return jax.tree.map(lambda _: 1.0, params)
  num_layers = sum(layers_per_stage(depths)) + 2
  return jax.tree_util.tree_map_with_path(
      lambda p, _: float(rate ** (num_layers - 1 - layer_id([_key(k) for k in p], depths))),
      params)


def decay_mask(params, no_decay_names: Sequence[str]):
  """Per-leaf weight-decay flag (a tree of bools like `params`)."""
  fragments = [f for name in no_decay_names for f in _FLAX_NAMES.get(name, (name,))]

  def flag(path, x):
    keys = [_key(k) for k in path]
    joined = "/".join(keys)
    return not (len(x.shape) <= 1 or keys[-1] == "bias"
                or any(f in joined for f in fragments))

  return jax.tree_util.tree_map_with_path(flag, params)


def _linear_warmup(schedule, warmup_steps: int, warmup_ratio: float):
  """mmcv's linear warmup: `regular(t) * (1 - (1 - t / W) * (1 - ratio))` for t < W."""
  if warmup_steps <= 0:
    return schedule

  def fn(t):
    t = jnp.asarray(t, jnp.float32)
    factor = 1.0 - (1.0 - t / warmup_steps) * (1.0 - warmup_ratio)
    return schedule(t) * jnp.where(t < warmup_steps, factor, 1.0)
  return fn


def make_schedule(cfg, base_lr: float, total_steps: int):
  """Learning rate as a function of the 0-based step, from a config's `schedule`.

  * `step`: base_lr * gamma ** (number of `boundaries` <= t), with mmcv warmup.
  * `linear_annealing`: from base_lr to base_lr * min_lr_ratio over total_steps,
    with mmcv warmup.
  * `exp`: torch ExponentialLR(decay_rate) stepped at every `decay_interval`-th
    iteration of each epoch (iteration 0 included) of `steps_per_epoch` steps, as
    the depth VQ-VAE trainer does.
  * `cosine`: timm CosineLRScheduler(t_initial=total_steps, lr_min, warmup_t =
    warmup_steps, warmup_lr_init = warmup_ratio * base_lr) updated after each step.
  """
  name = cfg.name
  if name not in SCHEDULES:
    raise ValueError(f"config.schedule.name={name!r} is not one of {SCHEDULES}")
  if name == "constant":
    return lambda t: jnp.full((), base_lr, jnp.float32)
  if name == "step":
    bounds = jnp.asarray(list(cfg.boundaries) or [total_steps + 1], jnp.float32)
    regular = lambda t: base_lr * cfg.gamma ** jnp.sum(jnp.asarray(t, jnp.float32) >= bounds)
    return _linear_warmup(regular, cfg.warmup_steps, cfg.warmup_ratio)
  if name == "linear_annealing":
    target = base_lr * cfg.min_lr_ratio
    regular = lambda t: (base_lr + (target - base_lr)
                         * jnp.asarray(t, jnp.float32) / total_steps)
    return _linear_warmup(regular, cfg.warmup_steps, cfg.warmup_ratio)
  if name == "exp":
    k, spe = cfg.decay_interval, cfg.steps_per_epoch
    if spe <= 0:
      raise ValueError("config.schedule.steps_per_epoch must be set (> 0) for 'exp'")
    per_epoch = math.ceil(spe / k)

    def exp_fn(t):
      t = jnp.asarray(t, jnp.int32)
      count = (t // spe) * per_epoch + (t % spe + k - 1) // k
      return base_lr * cfg.decay_rate ** count.astype(jnp.float32)
    return exp_fn
  warm, init = cfg.warmup_steps, cfg.warmup_ratio * base_lr

  def cosine_fn(t):
    u = jnp.maximum(jnp.asarray(t, jnp.float32) - 1.0, 0.0)  # set after step t - 1
    warmup = init + u * (base_lr - init) / max(warm, 1)
    cos = cfg.lr_min + 0.5 * (base_lr - cfg.lr_min) * (1 + jnp.cos(jnp.pi * u / total_steps))
    cos = jnp.where(u >= total_steps, cfg.lr_min, cos)
    return jnp.where(u < warm, warmup, cos)
  return cosine_fn


def _scale_by_tree(scales) -> optax.GradientTransformation:
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s, updates, scales), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(cfg, params, total_steps: int) -> tuple[optax.GradientTransformation,
                                                            callable]:
  """(optax transformation, schedule) from a config's `optimizer` and `schedule`.

  `params` (arrays or ShapeDtypeStructs) decide the per-leaf scales and masks.
  Order, as in mmcv + torch: clip the gradients' global norm, Adam moments, decoupled
  weight decay of the old parameters, times the scheduled lr and the layer scale.
  """
  opt = cfg.optimizer
  if opt.name not in ("adamw", "adam"):
    raise ValueError(f"config.optimizer.name={opt.name!r} is not 'adamw' or 'adam'")
  schedule = make_schedule(cfg.schedule, opt.lr, total_steps)
  parts = []
  if opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  if opt.name == "adam" and opt.weight_decay:
    parts.append(optax.add_decayed_weights(opt.weight_decay))  # torch Adam: L2 in grads
  parts.append(optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps))
  if opt.name == "adamw" and opt.weight_decay:
    parts.append(optax.add_decayed_weights(
        opt.weight_decay, mask=decay_mask(params, opt.no_decay_names)))
  parts.append(optax.scale_by_learning_rate(schedule))
  scales = lr_scales(params, opt.layer_decay_depths, opt.layer_decay_rate)
  if any(s != 1.0 for s in jax.tree.leaves(scales)):
    parts.append(_scale_by_tree(scales))
  return optax.chain(*parts), schedule


def summarize(params, cfg) -> Mapping[str, tuple[float, bool]]:
  """'path' -> (lr scale, weight decay on) for every parameter (for logs and tests)."""
  opt = cfg.optimizer
  scales = lr_scales(params, opt.layer_decay_depths, opt.layer_decay_rate)
  mask = decay_mask(params, opt.no_decay_names)
  flat_s = jax.tree_util.tree_flatten_with_path(scales)[0]
  flat_m = jax.tree.leaves(mask)
  return {"/".join(_key(k) for k in p): (s, m) for (p, s), m in zip(flat_s, flat_m)}
