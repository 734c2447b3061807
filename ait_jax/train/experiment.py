"""The two training stages as the loop sees them: model, variables, loss, tasks.

* `AitExperiment` (stage 2): the AiT model from the reference `model` dict, its tasks,
  and the frozen tokenizers, passed to the step beside the trainable parameters.
* `TokenizerExperiment` (stage 1): one VQ-VAE, whose EMA codebook (collection 'vq')
  is state the step updates without gradients (`TrainState.extra`).
"""

import logging
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ait_jax.checkpoint import mapping, pretrained, torch_files
from ait_jax.checkpoint.ait import ait_from_reference_config
from ait_jax.checkpoint.vqvae import vqvae_from_reference_kwargs
from ait_jax.models.vqvae import Encoder
from ait_jax.parallel import sharding
from ait_jax.train import tasks as tasks_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict      # trainable, float32
  opt_state: object
  extra: dict       # non-trainable variables the step updates (the EMA codebook)


def compute_dtype(cfg):
  if cfg.compute_dtype not in DTYPES:
    raise ValueError(f"config.compute_dtype={cfg.compute_dtype!r} is not one of "
                     f"{sorted(DTYPES)}")
  return DTYPES[cfg.compute_dtype]


def _import(path: str, role: str, target) -> "pretrained.PartImport":
  """One reference weights file (.pth/.pt, .npz, .safetensors), or an ait-jax AiT
  workdir's latest weights, as part `role`."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such weights file or workdir")
  if os.path.isdir(path):
    from ait_jax import convert  # pylint: disable=g-import-not-at-top (it imports this)
    file = convert.workdir_file(path)
  else:
    file = torch_files.read_state_dict(path)
  part = pretrained.import_part(file, role, target)
  for problem in part.problems():
    logging.warning("%s (as %s): %s", path, role, problem)
  return part


class Experiment:
  """What the loop needs from a stage; see the subclasses."""
  model: nn.Module
  tasks: dict

  def __init__(self, cfg, workdir: str, mesh):
    self.cfg, self.workdir, self.mesh = cfg, workdir, mesh

  def init_variables(self, rng):
    """(boxed params, boxed extra) of a fresh model."""
    raise NotImplementedError

  def frozen(self):
    """(variables, shardings) passed to every step untouched (stage 2: tokenizers)."""
    return {}, {}

  def loss(self, params, extra, frozen, batch, rng):
    """(loss, (metrics, new extra)) of one global batch `{task: {key: array}}`."""
    raise NotImplementedError

  def predict(self, task: str, params, extra, frozen, inputs):
    raise NotImplementedError

  def load_initial_weights(self, params):
    """Parameters with the parts the config's `init` names replaced."""
    return params


class AitExperiment(Experiment):
  """Stage 2: AiT on the config's tasks, tokenizers frozen."""

  def __init__(self, cfg, workdir: str, mesh, tokenizer_sources: dict | None = None):
    super().__init__(cfg, workdir, mesh)
    self.ref = ait_from_reference_config(cfg.model.to_dict(), dtype=compute_dtype(cfg))
    self.model = self.ref.model
    missing = sorted(set(cfg.tasks) - set(self.ref.task_heads))
    if missing:
      raise ValueError(f"config.tasks has {missing}, which config.model.task_heads lacks "
                       f"(heads: {sorted(self.ref.task_heads)})")
    self.tasks = {t: tasks_lib.ait_task(t, cfg=cfg, workdir=workdir, model=self.model,
                                        tokenizer=self.ref.tokenizers.get(t),
                                        head=self.ref.task_heads[t])
                  for t in cfg.tasks}
    self.tokenizer_sources = tokenizer_sources or {}

  def init_variables(self, rng):
    # The smallest input the backbone takes: the parameters do not depend on it.
    side = self.model.backbone.patch_size * 2 ** (len(self.model.backbone.depths) - 1)
    images = jnp.zeros((1, side, side, 3), jnp.float32)
    seq = jnp.zeros((1, 1), jnp.int32)
    variables = self.model.init({"params": rng}, images, seq, jnp.zeros((1,), jnp.int32))
    return variables["params"], {}

  def frozen(self):
    """The tokenizers of the trained tasks, replicated."""
    variables, shardings = {}, {}
    for task, tok in self.ref.tokenizers.items():
      if task not in self.tasks:
        continue
      source = self.tokenizer_sources.get(task) or self.cfg.tokenizers[task].checkpoint
      if not source:
        raise ValueError(f"no tokenizer for task {task!r}: set config.tokenizers.{task}."
                         "checkpoint to a stage-1 workdir or a reference VQ-VAE "
                         "state_dict (.npz/.safetensors), or train_if_missing=True")
      values = load_tokenizer(source, tok, self.mesh)
      rep = sharding.replicated(self.mesh)
      variables[task] = jax.device_put(values, rep)
      shardings[task] = jax.tree.map(lambda _: rep, values)
    return variables, shardings

  def loss(self, params, extra, frozen, batch, rng):
    total, metrics = 0.0, {}
    for i, (name, task) in enumerate(self.tasks.items()):
      loss, m = task.loss(params, frozen.get(name), batch[name], jax.random.fold_in(rng, i))
      total = total + loss
      metrics.update(m)
    return total, ({**metrics, "loss": total}, extra)

  def predict(self, task, params, extra, frozen, inputs):
    return self.tasks[task].predict(params, frozen.get(task), inputs)

  def load_initial_weights(self, params):
    """The parameters with what `init.model` (a reference AiT checkpoint, the
    reference's `load_from`) and `init.backbone` (a pretrained SwinV2) hold."""
    init = self.cfg.init
    roles = [(f, r) for f, r in ((init.model, pretrained.AIT),
                                 (init.backbone, pretrained.BACKBONE)) if f]
    if not roles:
      return params
    target = pretrained.ait_target(self.ref)
    combined = pretrained.combine([_import(f, r, target) for f, r in roles], target)
    pretrained.check(combined, allow_partial=True, what="config.init")
    flat = mapping.flatten(params)
    root = ("model", "params")
    count = 0
    for path, value in combined.loaded.items():
      if path[:2] != root:
        continue  # the tokenizers of an AiT checkpoint come from config.tokenizers
      leaf = flat[path[2:]]
      flat[path[2:]] = jax.device_put(np.asarray(value, leaf.dtype), leaf.sharding)
      count += 1
    logging.info("config.init: loaded %d of %d parameters", count, len(flat))
    return mapping.unflatten(flat)


class TokenizerExperiment(Experiment):
  """Stage 1: one VQ-VAE (the reference `vae/models/VQVAE.py` keywords)."""

  def __init__(self, cfg, workdir: str, mesh):
    super().__init__(cfg, workdir, mesh)
    self.model = vqvae_from_reference_kwargs(cfg.model.to_dict(), "train").clone(
        dtype=compute_dtype(cfg))
    if cfg.task not in tasks_lib.TOKENIZER_TASKS:
      raise ValueError(f"config.task={cfg.task!r} has no tokenizer trainer; known: "
                       f"{sorted(tasks_lib.TOKENIZER_TASKS)}")
    self.tasks = {cfg.task: tasks_lib.TOKENIZER_TASKS[cfg.task](cfg=cfg, workdir=workdir,
                                                                model=self.model)}

  def init_variables(self, rng):
    s = self.model.mask_size
    variables = self.model.init({"params": rng}, jnp.zeros((1, s, s), jnp.float32))
    return variables["params"], {"vq": variables["vq"]}

  def loss(self, params, extra, frozen, batch, rng):
    del frozen
    (name, task), = self.tasks.items()
    loss, metrics, extra = task.loss(params, extra, batch[name], rng)
    return loss, ({**metrics, "loss": loss}, extra)

  def predict(self, task, params, extra, frozen, inputs):
    return self.tasks[task].predict(params, extra, inputs)

  def initialize_codebook(self, state, batch, extra_shardings):
    """`codebook_init='data'`: codes drawn from the encoder's features of `batch`.

    The EMA statistics are set consistent with them (`ema_w = embedding`,
    `ema_cluster_size = 1`), so no code starts dead.
    """
    (name, task), = self.tasks.items()
    inputs = task.tokenizer_inputs(batch[name])
    _, captured = jax.jit(lambda p, e, x: self.model.apply(
        {"params": p, **e}, x, capture_intermediates=lambda m, _: isinstance(m, Encoder),
        mutable=["intermediates"]))(state.params, state.extra, inputs)
    feats = np.asarray(jax.tree.leaves(captured["intermediates"])[0], np.float32)
    feats = feats.reshape(-1, feats.shape[-1])
    k = self.model.num_embeddings
    rng = np.random.default_rng(self.cfg.seed)
    rows = rng.choice(len(feats), size=k, replace=len(feats) < k)
    codes = feats[rows] + rng.normal(0.0, 1e-3, (k, feats.shape[-1])).astype(np.float32)
    vq = {"quantizer": {"embedding": codes, "ema_w": codes,
                        "ema_cluster_size": np.ones((k,), np.float32)}}
    extra = jax.device_put({"vq": vq}, extra_shardings)
    return state.replace(extra=extra)


def make_experiment(cfg, workdir: str, mesh, **kwargs) -> Experiment:
  if cfg.stage == "ait":
    return AitExperiment(cfg, workdir, mesh, **kwargs)
  if cfg.stage == "tokenizer":
    return TokenizerExperiment(cfg, workdir, mesh)
  raise ValueError(f"config.stage={cfg.stage!r} is not 'ait' or 'tokenizer'")


def load_tokenizer(source: str, tokenizer, mesh) -> dict:
  """{'params', 'vq'} of a frozen tokenizer from a stage-1 workdir or a reference file."""
  if os.path.isdir(source):
    from ait_jax.train import trainer  # pylint: disable=g-import-not-at-top
    state = trainer.restore_workdir_state(source, mesh)
    values = {"params": state.params, **state.extra}
  else:
    task = "tokenizer"
    target = pretrained.tokenizer_target(tokenizer, task)
    combined = pretrained.combine([_import(source, task, target)], target)
    pretrained.check(combined, allow_partial=False, what=f"the tokenizer ({source})")
    values = mapping.unflatten(combined.loaded)
  want = nn.meta.unbox(jax.eval_shape(
      lambda: tokenizer.init(jax.random.key(0), jnp.zeros(
          (1, tokenizer.mask_size, tokenizer.mask_size), jnp.float32))))
  want = {k: want[k] for k in ("params", "vq")}
  got_shapes = jax.tree.map(lambda x: tuple(x.shape), values)
  want_shapes = jax.tree.map(lambda x: tuple(x.shape), want)
  if got_shapes != want_shapes:
    raise ValueError(f"{source}: the tokenizer's variables do not fit the vae_cfg of "
                     "this config (different sizes or layers); compare its config.json "
                     "with config.model.task_heads.<task>.vae_cfg")
  return jax.tree.map(lambda x: np.asarray(x, np.float32), values)
