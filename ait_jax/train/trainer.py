"""The training loop: sharded state, compiled step, checkpoints, evaluation, reporting.

Every process runs this same code; arrays are global and sharded over the mesh, each
process feeding its own rows of every batch. The state is created directly sharded
(abstract shapes first, then a jitted init with output shardings), and the step is
`jax.jit` with explicit in/out shardings and the state donated.

Resuming: a run whose workdir holds a checkpoint continues from the latest one, with
exactly the next batch (the loaders' states are part of the checkpoint). SIGTERM
(preemption) makes every process save the current step and exit cleanly.
"""

import json
import logging
import os
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from input_pipeline import sources_images

from ait_jax.checkpoint.manager import Checkpointer, abstract_like
from ait_jax.parallel import distributed, mesh as mesh_lib, sharding
from ait_jax.train import data as data_lib
from ait_jax.train import experiment as experiment_lib
from ait_jax.train import optimizer as optimizer_lib
from ait_jax.train import reporting
from ait_jax.train.experiment import TrainState

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
PREDICTIONS_DIR = "predictions"


class StateFactory:
  """Abstract shapes, shardings and a sharded init of an experiment's train state."""

  def __init__(self, exp: experiment_lib.Experiment, cfg, mesh):
    self.exp, self.cfg, self.mesh = exp, cfg, mesh
    rng = jax.random.key(cfg.seed)
    boxed_params, boxed_extra = jax.eval_shape(exp.init_variables, rng)
    self.param_shardings = sharding.logical_to_sharding(boxed_params, mesh)
    extra_shardings = sharding.logical_to_sharding(boxed_extra, mesh)
    abstract_params = nn.meta.unbox(boxed_params)
    self.tx, self.schedule = optimizer_lib.make_optimizer(cfg, abstract_params,
                                                          cfg.total_steps)
    self.abstract = jax.eval_shape(self._init, rng)
    self.shardings = TrainState(
        step=sharding.replicated(mesh), params=self.param_shardings,
        opt_state=sharding.like_params(self.abstract.opt_state, abstract_params,
                                       self.param_shardings, mesh),
        extra=extra_shardings)

  def _init(self, rng) -> TrainState:
    params, extra = self.exp.init_variables(rng)
    params, extra = nn.meta.unbox(params), nn.meta.unbox(extra)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params), extra=extra)

  def create(self) -> TrainState:
    init = jax.jit(self._init, out_shardings=self.shardings)
    state = init(jax.random.key(self.cfg.seed))
    params = self.exp.load_initial_weights(state.params)
    if params is not state.params:
      state = state.replace(params=params, opt_state=jax.jit(
          self.tx.init, out_shardings=self.shardings.opt_state)(params))
    return state

  def abstract_with_shardings(self):
    return abstract_like(self.abstract, self.shardings)


def make_train_step(exp, factory: StateFactory, cfg):
  """The compiled step: (state, frozen, batch) -> (state, metrics)."""
  accum = int(cfg.grad_accum_steps)
  base_key = jax.random.key(cfg.seed + 1)
  grad_fn = jax.value_and_grad(
      lambda params, extra, frozen, batch, rng: exp.loss(params, extra, frozen, batch, rng),
      has_aux=True)

  def step(state: TrainState, frozen, batch):
    rng = jax.random.fold_in(base_key, state.step)
    if accum == 1:
      (loss, (metrics, extra)), grads = grad_fn(state.params, state.extra, frozen, batch,
                                                rng)
    else:
      # Micro-batch k holds rows k, k + accum, ...: every device keeps its own rows.
      micro = jax.tree.map(
          lambda x: x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1),
          batch)

      def body(carry, xs):
        grads_sum, extra = carry
        mb, i = xs
        (loss, (metrics, extra)), grads = grad_fn(state.params, extra, frozen, mb,
                                                  jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, grads_sum, grads), extra), (loss, metrics)

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, extra), (losses, metrics) = jax.lax.scan(
          body, (zeros, state.extra), (micro, jnp.arange(accum)))
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss = jnp.mean(losses)
      metrics = jax.tree.map(jnp.mean, metrics)
    updates, opt_state = factory.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "learning_rate": factory.schedule(state.step),
               "grad_norm": optax.global_norm(grads)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                      extra=extra), metrics

  return step


def compile_train_step(exp, factory: StateFactory, cfg, frozen_shardings):
  return jax.jit(make_train_step(exp, factory, cfg),
                 in_shardings=(factory.shardings, frozen_shardings,
                               sharding.batch_sharding(factory.mesh)),
                 out_shardings=(factory.shardings, sharding.replicated(factory.mesh)),
                 donate_argnums=(0,))


def _check_batch(cfg, mesh, batch_size: int, what: str) -> None:
  shards = sharding.batch_shards(mesh) * int(cfg.grad_accum_steps if what == "batch_size"
                                             else 1)
  if batch_size % shards or batch_size % data_lib.num_shards(cfg.data):
    raise ValueError(f"{what} {batch_size} must be a multiple of the mesh's data x fsdp = "
                     f"{sharding.batch_shards(mesh)} devices"
                     + (f" times grad_accum_steps {cfg.grad_accum_steps}"
                        if what == "batch_size" else "")
                     + f" and of data.num_shards {data_lib.num_shards(cfg.data)}")


class Evaluator:
  """Runs each task's jitted prediction over its test split and its metrics."""

  def __init__(self, exp, factory: StateFactory, frozen_shardings):
    self.exp, self.mesh = exp, factory.mesh
    batch = sharding.batch_sharding(self.mesh)
    self._predict = {
        name: jax.jit(lambda params, extra, frozen, x, name=name: exp.predict(
            name, params, extra, frozen, x),
                      in_shardings=(factory.shardings.params, factory.shardings.extra,
                                    frozen_shardings, batch),
                      out_shardings=batch)
        for name in exp.tasks}
    replicated = sharding.replicated(self.mesh)
    self._predict_replicated = {
        name: jax.jit(lambda params, extra, frozen, x, name=name: exp.predict(
            name, params, extra, frozen, x),
                      in_shardings=(factory.shardings.params, factory.shardings.extra,
                                    frozen_shardings, replicated),
                      out_shardings=replicated)
        for name in exp.tasks}

  def _batches(self, task):
    _check_batch(self.exp.cfg, self.mesh, task.task_cfg.eval_batch_size,
                 f"config.tasks.{task.name}.eval_batch_size")
    data = data_lib.make_data({task.name: task.eval_loader}, self.exp.cfg.data)
    try:
      for i, batch in enumerate(data):
        if task.eval_batches() and i >= task.eval_batches():
          break
        yield batch[task.name]
    finally:
      data.close()

  def _run(self, task, state, frozen, batch):
    key = getattr(task, "eval_input_key", None) or _input_key(batch)
    x = sharding.host_batch_to_global(batch[key], self.mesh)
    out = self._predict[task.name](state.params, state.extra, frozen, x)
    return sharding.global_to_host_local(out, self.mesh)

  def evaluate(self, state, frozen) -> dict:
    results = {}
    for name, task in self.exp.tasks.items():
      acc = task.eval_start()
      for batch in self._batches(task):
        task.eval_update(acc, self._run(task, state, frozen, batch), batch)
      results.update({f"{name}/{k}": v for k, v in task.eval_result(acc).items()})
    return results

  def predict(self, state, frozen, outdir: str) -> int:
    """Writes each task's predictions under outdir/<task>/; returns their number."""
    total = 0
    for name, task in self.exp.tasks.items():
      if not hasattr(task, "write_predictions"):
        raise ValueError(f"task {name!r} has no prediction writer")
      index = 0
      for batch in self._batches(task):
        pred = self._run(task, state, frozen, batch)
        # Shard-major order: numbering is unique per process.
        first = index + jax.process_index() * 10 ** 6
        index += task.write_predictions(os.path.join(outdir, name), pred, batch, first)
      total += index
    return total


  def predict_images(self, state, frozen, source, outdir: str) -> int:
    """Writes each task's predictions of `source`'s images (an `ImageFileSource`) into
    outdir (outdir/<task>/ when the config has several tasks), named by the images'
    stems; returns the number of images written.

    Images have any size, so they go one at a time (a compilation per new size). Every
    process reads and computes every image, a batch of one replicated over the mesh, so
    all run the same programs; only process 0 writes.
    """
    replicated = sharding.replicated(self.mesh)
    for name, task in self.exp.tasks.items():
      if not hasattr(task, "write_image_prediction"):
        raise ValueError(f"task {name!r} cannot predict on image files")
      taskdir = outdir if len(self.exp.tasks) == 1 else os.path.join(outdir, name)
      for i, record in enumerate(source):
        x, meta = task.image_input(record["image"])
        x = x[None]
        x = jax.make_array_from_callback(x.shape, replicated, lambda idx, x=x: x[idx])
        out = self._predict_replicated[name](state.params, state.extra, frozen, x)
        pred = jax.tree.map(lambda a: np.asarray(a.addressable_data(0))[0], out)
        if jax.process_index() == 0:
          task.write_image_prediction(taskdir, record["stem"], record["image"], pred, meta)
        logging.info("%s: %d/%d %s", name, i + 1, len(source), record["path"])
    return len(source)


def _input_key(batch: dict) -> str:
  for key in ("image", "depth", "mask"):
    if key in batch:
      return key
  raise KeyError(f"no model input among the batch keys {sorted(batch)}")


def write_config(cfg, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(cfg.to_json(indent=1))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: {workdir} is not an ait-jax workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_workdir_state(workdir: str, mesh) -> TrainState:
  """The latest train state of another run (e.g. the stage-1 tokenizer), on `mesh`."""
  cfg = read_config(workdir)
  exp = experiment_lib.make_experiment(cfg, workdir, mesh)
  factory = StateFactory(exp, cfg, mesh)
  ckpt = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), async_save=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"{workdir}/{CHECKPOINT_DIR} holds no complete checkpoint")
    state, _ = ckpt.restore(step, factory.abstract_with_shardings(), with_data=False)
  finally:
    ckpt.close()
  logging.info("restored %s at step %d", workdir, step)
  return state


class _Preemption:
  """Remembers a SIGTERM; the loop saves and stops at the next step boundary."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint at the next step, then exiting")
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


class Run:
  """One experiment in one workdir: state, data, step, checkpoints, reports."""

  def __init__(self, cfg, workdir: str, *, tokenizer_sources: dict | None = None):
    self.cfg, self.workdir = cfg, workdir
    self.mesh = mesh_lib.mesh_from_config(cfg.mesh)
    logging.info("mesh %s over %d devices in %d processes", dict(self.mesh.shape),
                 jax.device_count(), jax.process_count())
    self.exp = experiment_lib.make_experiment(cfg, workdir, self.mesh,
                                              **({"tokenizer_sources": tokenizer_sources}
                                                 if cfg.stage == "ait" else {}))
    self.factory = StateFactory(self.exp, cfg, self.mesh)
    self.frozen, self.frozen_shardings = self.exp.frozen()
    self.checkpointer = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR),
                                     keep=cfg.checkpoint.keep,
                                     async_save=cfg.checkpoint.async_save)
    self.evaluator = Evaluator(self.exp, self.factory, self.frozen_shardings)

  def restore_or_create(self, data=None) -> TrainState:
    step = self.checkpointer.latest_step()
    if step is None:
      return self.factory.create()
    state, data_state = self.checkpointer.restore(
        step, self.factory.abstract_with_shardings(), with_data=data is not None)
    if data is not None and data_state:
      data.set_state(data_state)
    elif data is not None:
      # Weights converted from reference files (ait_jax.convert) carry no loader state.
      logging.warning("the checkpoint of step %d holds no data-loader state (converted "
                      "weights): the data pipeline starts from its beginning", step)
    logging.info("resumed from the checkpoint of step %d", step)
    return state

  def train(self) -> TrainState:
    cfg = self.cfg
    for name, task in self.exp.tasks.items():
      _check_batch(cfg, self.mesh, task.task_cfg.batch_size, "batch_size")
    write_config(cfg, self.workdir)
    data = data_lib.make_data(
        {n: t.train_loader for n, t in self.exp.tasks.items()}, cfg.data,
        prepare={n: t.prepare for n, t in self.exp.tasks.items() if hasattr(t, "prepare")})
    state = self.restore_or_create(data)
    step = int(state.step)
    reporting.truncate_metrics(self.workdir, step)
    reporter = reporting.Reporter(self.workdir, cfg.total_steps,
                                  progress_bar=cfg.progress_bar)
    train_step = compile_train_step(self.exp, self.factory, cfg, self.frozen_shardings)
    preemption = _Preemption()
    profiling = False
    reporter.start(step)
    try:
      while step < cfg.total_steps:
        if step == cfg.profile.start_step and distributed.is_primary():
          jax.profiler.start_trace(os.path.join(self.workdir, "profile"))
          profiling = True
        batch = sharding.host_batch_to_global(next(data), self.mesh)
        if step == 0 and cfg.stage == "tokenizer" and cfg.codebook_init == "data":
          state = self.exp.initialize_codebook(state, batch, self.factory.shardings.extra)
        state, metrics = train_step(state, self.frozen, batch)
        step += 1
        if profiling and step >= cfg.profile.start_step + cfg.profile.num_steps:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
          profiling = False
        last = step == cfg.total_steps
        if step % cfg.log_every_steps == 0 or last:
          reporter.train(step, jax.device_get(metrics))
        stop = distributed.any_process(preemption.requested)
        if step % cfg.checkpoint.every_steps == 0 or last or stop:
          self.checkpointer.save(step, state, data.get_state())
        if stop:
          logging.warning("stopped by SIGTERM at step %d (checkpoint saved)", step)
          break
        if (cfg.eval_every_steps and step % cfg.eval_every_steps == 0) or (
            last and cfg.eval_at_end):
          reporter.eval(step, self.evaluator.evaluate(state, self.frozen))
    finally:
      if profiling:
        jax.profiler.stop_trace()
      preemption.restore()
      self.checkpointer.wait_until_finished()
      data.close()
      reporter.close()
    return state

  def evaluate(self) -> dict:
    state = self._restore_latest()
    metrics = self.evaluator.evaluate(state, self.frozen)
    reporter = reporting.Reporter(self.workdir, self.cfg.total_steps, progress_bar=False)
    reporter.eval(int(state.step), metrics)
    reporter.close()
    return metrics

  def predict(self, outdir: str, images=None) -> int:
    """Predictions of the test split, or of `images` (an `ImageFileSource`)."""
    state = self._restore_latest()
    if images is None:
      return self.evaluator.predict(state, self.frozen, outdir)
    return self.evaluator.predict_images(state, self.frozen, images, outdir)

  def _restore_latest(self) -> TrainState:
    step = self.checkpointer.latest_step()
    if step is None:
      raise FileNotFoundError(f"{self.workdir}/{CHECKPOINT_DIR} holds no checkpoint; "
                              "train first (--mode train)")
    state, _ = self.checkpointer.restore(step, self.factory.abstract_with_shardings(),
                                         with_data=False)
    return state

  def close(self) -> None:
    self.checkpointer.close()


def _resolve_config_path(path: str) -> str:
  if os.path.isabs(path) or os.path.exists(path):
    return path
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  candidate = os.path.join(repo, path)
  if not os.path.exists(candidate):
    raise FileNotFoundError(f"config file {path!r} not found (relative to the current "
                            f"directory or {repo})")
  return candidate


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file, as absl's --config flag loads it."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = _resolve_config_path(path)
  spec = importlib.util.spec_from_file_location(
      "ait_config_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def prepare_tokenizers(cfg, workdir: str) -> dict[str, str]:
  """Trains the missing stage-1 tokenizers that the config asks for; returns
  {task: tokenizer source} for every task whose tokenizer comes from a workdir."""
  sources = {}
  for task in cfg.tasks:
    if task not in cfg.tokenizers:
      continue
    tok = cfg.tokenizers[task]
    if tok.checkpoint or not tok.train_if_missing:
      continue
    sub = os.path.join(workdir, f"tokenizer_{task}")
    sub_cfg = load_config_file(tok.config)
    with sub_cfg.unlocked():
      sub_cfg.mesh = cfg.mesh
      sub_cfg.data.num_shards = cfg.data.num_shards
      sub_cfg.data.synthetic_dir = (cfg.data.synthetic_dir
                                    or os.path.join(workdir, "data", "synthetic"))
      sub_cfg.data.synthetic = cfg.data.synthetic
      sub_cfg.progress_bar = cfg.progress_bar
    done = _finished(sub, sub_cfg.total_steps)
    if not done:
      logging.info("training the %s tokenizer first (%s) in %s", task, tok.config, sub)
      run = Run(sub_cfg, sub)
      try:
        run.train()
      finally:
        run.close()
    sources[task] = sub
  return sources


def _finished(workdir: str, total_steps: int) -> bool:
  path = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(path):
    return False
  ckpt = Checkpointer(path, async_save=False)
  try:
    return (ckpt.latest_step() or 0) >= total_steps
  finally:
    ckpt.close()


def predictions_dir(workdir: str, output: str | None = None) -> str:
  return output or os.path.join(workdir, PREDICTIONS_DIR)


def run(cfg, workdir: str, mode: str = "train", *, input_path: str | None = None,
        output: str | None = None):
  """The entry point's work: train, evaluate or predict in `workdir`.

  Predict writes into `output` (default workdir/predictions/): the test split's
  predictions, or with `input_path` (an image file or a folder of them) those of the
  images, no ground truth needed.
  """
  if mode not in ("train", "eval", "predict"):
    raise ValueError(f"mode {mode!r} is not 'train', 'eval' or 'predict'")
  if mode != "predict" and (input_path or output):
    raise ValueError("an input and an output are for --mode predict only")
  # Before the model is built: a bad input fails fast.
  images = sources_images.ImageFileSource(input_path) if input_path else None
  os.makedirs(workdir, exist_ok=True)
  sources = prepare_tokenizers(cfg, workdir) if cfg.stage == "ait" else None
  start = time.time()
  r = Run(cfg, workdir, tokenizer_sources=sources)
  try:
    if mode == "train":
      r.train()
    elif mode == "eval":
      return r.evaluate()
    else:
      return r.predict(predictions_dir(workdir, output), images)
  finally:
    r.close()
    logging.info("%s finished in %.1f s", mode, time.time() - start)
