"""The trainer's view of each task: its loaders, its loss on a batch, its evaluation.

Stage 2 (`AiT`) tasks compute the reference head's loss from the shared model's logits
(the task logic lives in `ait_jax/tasks/`); stage 1 tasks train a VQ-VAE tokenizer.
Losses are jit-able functions of global (sharded) batches. Evaluation runs a jitted
prediction on each batch and accumulates metrics on the host, per process; `result`
sums over processes (a collective) so every process gets the dataset's numbers.
"""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

import input_pipeline as ip
from ait_jax.evaluation import depth_metrics
from ait_jax.evaluation import mask_tokenizer
from ait_jax.models.ait import AiT
from ait_jax.models.transformer import DEPTH_TASK
from ait_jax.models.vqvae import VQVAE
from ait_jax.parallel import distributed
from ait_jax.tasks import depth as depth_lib
from ait_jax.tasks import depth_outputs
from ait_jax.train import data as data_lib

# The reference DepthHead's defaults for keys a config may leave out.
_DEPTH_HEAD_DEFAULTS = dict(loss_weight=1.0, decoder_loss_weight=0.0, soft_vae=False,
                            shift_window_test=True, shift_size=2, flip_test=True)


def _maybe(value):
  """A config tuple, or None when empty ('not set')."""
  return tuple(value) if value else None


class MeanAccumulator:
  """Sums of named values and a count, averaged over all processes at the end."""

  def __init__(self, names):
    self.names = tuple(names)
    self.sums = np.zeros(len(self.names) + 1, np.float64)

  def add(self, values: dict, count: int = 1) -> None:
    self.sums[:-1] += [values[n] * count for n in self.names]
    self.sums[-1] += count

  def result(self) -> dict[str, float]:
    total = distributed.sum_over_processes(self.sums)
    if total[-1] == 0:
      raise ValueError("no example was evaluated")
    return {n: float(v / total[-1]) for n, v in zip(self.names, total[:-1])}


@dataclasses.dataclass
class DepthTask:
  """Depth estimation on NYUv2 (the reference's DepthHead and nyudepthv2 dataset)."""
  cfg: object          # the whole config
  workdir: str
  model: AiT
  tokenizer: VQVAE
  head: dict           # the reference head config (model.task_heads.depth)
  name: str = "depth"
  task_id: int = DEPTH_TASK

  def __post_init__(self):
    self.task_cfg = self.cfg.tasks.depth
    self.opts = {k: self.head.get(k, v) for k, v in _DEPTH_HEAD_DEFAULTS.items()}
    self.vocab = self.model.transformer.vocab
    self.resizeto = int(self.cfg.model.get("resizeto", 0))
    self.padto = int(self.cfg.model.get("padto", 0))
    size = self.tokenizer.mask_size
    if tuple(self.task_cfg.crop_size) != (size, size):
      raise ValueError(f"config.tasks.depth.crop_size={tuple(self.task_cfg.crop_size)}, "
                       f"but the depth tokenizer encodes {size}x{size} maps "
                       "(model.task_heads.depth.vae_cfg.mask_size)")

  # --- data -----------------------------------------------------------------------

  def _source(self, split: str):
    return data_lib.nyu_source(self.task_cfg.source, self.cfg.data, self.workdir, split)

  def train_loader(self, shard: int) -> ip.Loader:
    t = self.task_cfg
    return ip.make_depth_loader(
        self._source("train"), train=True,
        options=data_lib.loader_options(self.cfg.data, t.batch_size, shard, self.cfg.seed),
        crop_size=tuple(t.crop_size), boundary_crop=_maybe(t.boundary_crop),
        resize_to=_maybe(t.resize_to))

  def eval_loader(self, shard: int) -> ip.Loader:
    return ip.make_depth_loader(
        self._source("test"), train=False,
        options=data_lib.loader_options(self.cfg.data, self.task_cfg.eval_batch_size,
                                        shard, self.cfg.seed))

  def example_batch(self, batch_size: int) -> dict:
    h, w = self.task_cfg.crop_size
    return {"image": jax.ShapeDtypeStruct((batch_size, h, w, 3), jnp.float32),
            "depth": jax.ShapeDtypeStruct((batch_size, h, w, 1), jnp.float32)}

  # --- training -------------------------------------------------------------------

  def loss(self, params, tokenizer_vars, batch, rng):
    """(loss, metrics) of one batch: the reference's normalised depth loss."""
    depth = batch["depth"][..., 0]
    images = depth_lib.resize_and_pad(batch["image"], resizeto=self.resizeto,
                                      padto=self.padto)
    target = depth_lib.depth_targets(self.tokenizer, tokenizer_vars, depth, self.vocab)
    task_ids = jnp.full((images.shape[0],), self.task_id, jnp.int32)
    logits = self.model.apply({"params": params}, images, target[:, :-1], task_ids,
                              train=True, rngs={"dropout": rng})
    loss, metrics = depth_lib.depth_loss(
        logits, target, depth, self.tokenizer, tokenizer_vars, self.vocab,
        loss_weight=float(self.opts["loss_weight"]),
        decoder_loss_weight=float(self.opts["decoder_loss_weight"]))
    return loss, {"depth_loss": loss, **metrics}

  # --- evaluation -----------------------------------------------------------------

  def predict(self, params, tokenizer_vars, images):
    """Depth (B, H, W) of test images (B, H, W, 3), as the reference tests.

    Images whose height is not the tokenizer's size (demo configs train on resized
    crops) are resized to it for the model, and the depth back to (H, W).
    """
    b, h, w, _ = images.shape
    size = self.tokenizer.mask_size
    if h != size:
      images = jax.image.resize(images, (b, size, max(size, round(w * size / h)), 3),
                                "linear")
    key = jax.random.key(0) if self.model.transformer.top_p > 0 else None
    depth = depth_lib.predict_depth(
        self.model, {"params": params}, self.tokenizer, tokenizer_vars, images,
        token_length=self.tokenizer.token_length, soft=bool(self.opts["soft_vae"]),
        shift_window_test=bool(self.opts["shift_window_test"]),
        shift_size=int(self.opts["shift_size"]), flip_test=bool(self.opts["flip_test"]),
        key=key, resizeto=self.resizeto, padto=self.padto)
    if depth.shape[1:] != (h, w):
      depth = jnp.maximum(jax.image.resize(depth, (b, h, w), "linear"),
                          depth_lib.MIN_DEPTH)
    return depth

  @functools.cached_property
  def train_mean_depth(self) -> float:
    """Mean valid depth over the training split (the constant baseline)."""
    source = data_lib.nyu_source(self.task_cfg.source, self.cfg.data, self.workdir,
                                 "train", load_image=False)
    total, count = 0.0, 0
    for i in range(len(source)):
      d = source[i]["depth"]
      total += float(d[d > 0].sum())
      count += int((d > 0).sum())
    return total / max(count, 1)

  def eval_start(self):
    names = depth_metrics.METRIC_NAMES
    if self.task_cfg.eval_baseline:
      names = names + tuple(f"baseline_{n}" for n in depth_metrics.METRIC_NAMES)
    return MeanAccumulator(names)

  def eval_update(self, acc: MeanAccumulator, pred: np.ndarray, batch: dict) -> None:
    for p, gt, valid in zip(pred, batch["depth"][..., 0], batch["valid"]):
      if not valid:
        continue
      values = depth_metrics.depth_metrics(p, gt)
      if self.task_cfg.eval_baseline:
        const = np.full_like(p, self.train_mean_depth)
        values.update({f"baseline_{k}": v
                       for k, v in depth_metrics.depth_metrics(const, gt).items()})
      acc.add(values)

  def eval_result(self, acc: MeanAccumulator) -> dict:
    return acc.result()

  def eval_batches(self) -> int:
    return self.task_cfg.eval_max_batches

  def write_predictions(self, outdir: str, pred: np.ndarray, batch: dict,
                        first_index: int) -> int:
    """16-bit PNGs of depth in millimetres (the NYU format); returns images written."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    import os  # pylint: disable=g-import-not-at-top
    os.makedirs(outdir, exist_ok=True)
    n = 0
    for p, valid in zip(pred, batch["valid"]):
      if valid:
        mm = np.clip(np.rint(p * 1000), 0, 65535).astype(np.uint16)
        Image.fromarray(mm).save(os.path.join(outdir, f"{first_index + n:05d}.png"))
        n += 1
    return n

  # --- prediction on image files (--mode predict --input) -----------------------------

  def image_input(self, image: np.ndarray) -> tuple[np.ndarray, dict]:
    """The model input of one uint8 image (H, W, 3), as the test split feeds it: the
    whole frame in [0, 1]; `predict` applies the test-time geometry and returns (H, W)."""
    return ip.transforms_depth.ToFloat().map({"image": image})["image"], {}

  def write_image_prediction(self, outdir: str, stem: str, image: np.ndarray,
                             pred: np.ndarray, meta: dict) -> None:
    """The three files of `depth_outputs.write_depth_prediction`, at the image's size."""
    del meta
    if pred.shape != image.shape[:2]:
      raise ValueError(f"{stem}: depth {pred.shape} is not at the image's size "
                       f"{image.shape[:2]}")
    depth_outputs.write_depth_prediction(pred, outdir, stem)


# --- stage 1: the tokenizers -------------------------------------------------------

@dataclasses.dataclass
class DepthTokenizerTask:
  """The depth VQ-VAE on NYUv2 depth maps with mask augmentation."""
  cfg: object
  workdir: str
  model: VQVAE
  name: str = "depth"

  def __post_init__(self):
    self.task_cfg = self.cfg.tasks.depth
    size = self.model.mask_size
    if tuple(self.task_cfg.crop_size) != (size, size):
      raise ValueError(f"config.tasks.depth.crop_size={tuple(self.task_cfg.crop_size)}, "
                       f"but the VQ-VAE's image_size is {size}")

  def _source(self, split):
    return data_lib.nyu_source(self.task_cfg.source, self.cfg.data, self.workdir, split,
                               load_image=False)

  def train_loader(self, shard: int) -> ip.Loader:
    t = self.task_cfg
    return ip.make_depth_tokenizer_loader(
        self._source("train"), train=True,
        options=data_lib.loader_options(self.cfg.data, t.batch_size, shard, self.cfg.seed),
        crop_size=tuple(t.crop_size), boundary_crop=_maybe(t.boundary_crop),
        mask_ratio=t.mask_ratio if t.mask_ratio > 0 else None, mask_patch=t.mask_patch,
        resize_to=_maybe(t.resize_to))

  def eval_loader(self, shard: int) -> ip.Loader:
    t = self.task_cfg
    return ip.make_depth_tokenizer_loader(
        self._source("test"), train=False,
        options=data_lib.loader_options(self.cfg.data, t.eval_batch_size, shard,
                                        self.cfg.seed),
        resize_to=_maybe(t.resize_to))

  def example_batch(self, batch_size: int) -> dict:
    h, w = self.task_cfg.crop_size
    shape = jax.ShapeDtypeStruct((batch_size, h, w, 1), jnp.float32)
    return {"depth": shape, "masked_depth": shape}

  def tokenizer_inputs(self, batch):
    return batch["depth"][..., 0]

  def loss(self, params, extra, batch, rng):
    """(loss, metrics, new extra): the training forward with the EMA codebook update."""
    del rng
    inputs = batch.get("masked_depth", batch["depth"])[..., 0]
    out, mutated = self.model.apply({"params": params, **extra}, inputs,
                                    batch["depth"][..., 0], train=True, mutable=["vq"])
    return out.total_loss, {"recon_loss": out.recon_loss, "vq_loss": out.vq_loss}, mutated

  def predict(self, params, extra, depth):
    """Reconstructions of the centre crops of whole depth maps (B, H, W, 1)."""
    crop = _center_crop(depth[..., 0], self.model.mask_size)
    out = self.model.apply({"params": params, **extra}, crop)
    return {"recon": out.out, "tokens": out.tokens, "target": crop}

  def eval_start(self):
    return (MeanAccumulator(("recon_mse", "rmse", "abs_rel")),
            np.zeros(self.model.num_embeddings, np.int64))

  def eval_update(self, acc, pred: dict, batch: dict) -> None:
    means, usage = acc
    for recon, target, tokens, valid in zip(pred["recon"], pred["target"], pred["tokens"],
                                            batch["valid"]):
      good = target > 0
      if not valid or not good.any():
        continue
      diff = recon[good] - target[good]
      means.add({"recon_mse": float(np.mean(diff ** 2)),
                 "rmse": float(np.sqrt(np.mean(diff ** 2))),
                 "abs_rel": float(np.mean(np.abs(diff) / target[good]))})
      np.add.at(usage, tokens, 1)

  def eval_result(self, acc) -> dict:
    means, usage = acc
    usage = distributed.sum_over_processes(usage)
    return {**means.result(), "codebook_usage": float(np.mean(usage > 0))}

  def eval_batches(self) -> int:
    return self.task_cfg.eval_max_batches


@dataclasses.dataclass
class MaskTokenizerTask:
  """The instance-mask VQ-VAE on box-cropped COCO masks ("maskcoco")."""
  cfg: object
  workdir: str
  model: VQVAE
  name: str = "insseg"

  def __post_init__(self):
    self.task_cfg = self.cfg.tasks.insseg

  def _annotations(self, split: str) -> str:
    ann, _ = data_lib.coco_split(self.cfg.data, self.task_cfg.source, self.workdir, split,
                                 "mask")
    return ann

  def train_loader(self, shard: int) -> ip.Loader:
    return ip.make_mask_tokenizer_loader(
        ip.CocoMaskSource(self._annotations("train"), mask_size=self.model.mask_size),
        train=True, options=data_lib.loader_options(
            self.cfg.data, self.task_cfg.batch_size, shard, self.cfg.seed))

  def eval_loader(self, shard: int) -> ip.Loader:
    """The reference's evaluation crops of every test annotation (see
    `ait_jax.evaluation.mask_tokenizer`)."""
    return ip.make_mask_tokenizer_loader(
        ip.CocoMaskEvalSource(self._annotations("test"), mask_size=self.model.mask_size),
        train=False, options=data_lib.loader_options(
            self.cfg.data, self.task_cfg.eval_batch_size, shard, self.cfg.seed))

  def example_batch(self, batch_size: int) -> dict:
    s = self.model.mask_size
    return {"mask": jax.ShapeDtypeStruct((batch_size, s, s, 1), jnp.float32)}

  def tokenizer_inputs(self, batch):
    return batch["mask"][..., 0].astype(jnp.float32)

  def loss(self, params, extra, batch, rng):
    del rng
    masks = batch["mask"][..., 0].astype(jnp.float32)
    out, mutated = self.model.apply({"params": params, **extra}, masks, train=True,
                                    mutable=["vq"])
    return out.total_loss, {"recon_loss": out.recon_loss, "vq_loss": out.vq_loss}, mutated

  def predict(self, params, extra, masks):
    out = self.model.apply({"params": params, **extra}, masks[..., 0].astype(jnp.float32))
    return {"recon": out.out, "tokens": out.tokens}

  def eval_start(self):
    return mask_tokenizer.MaskTokenizerEvaluator(self._annotations("test"),
                                                 self.model.num_embeddings)

  def eval_update(self, acc, pred: dict, batch: dict) -> None:
    acc.add(pred["recon"], pred["tokens"], batch)

  def eval_result(self, acc) -> dict:
    return acc.result()

  def eval_batches(self) -> int:
    return self.task_cfg.eval_max_batches


def _center_crop(maps, size: int):
  h, w = maps.shape[1:3]
  if h < size or w < size:
    raise ValueError(f"{h}x{w} maps are smaller than the {size}x{size} crop")
  top, left = (h - size) // 2, (w - size) // 2
  return maps[:, top:top + size, left:left + size]


def _object_task(name):
  def make(**kwargs):
    from ait_jax.train import object_tasks  # pylint: disable=g-import-not-at-top
    return object_tasks.ObjectTask(name=name, **kwargs)
  return make


AIT_TASKS = {"depth": DepthTask, "det": _object_task("det"),
             "insseg": _object_task("insseg")}
TOKENIZER_TASKS = {"depth": DepthTokenizerTask, "insseg": MaskTokenizerTask}


def ait_task(name: str, **kwargs):
  if name not in AIT_TASKS:
    raise ValueError(f"task {name!r} has no trainer yet; known: {sorted(AIT_TASKS)}")
  logging.info("task %s", name)
  return AIT_TASKS[name](**kwargs)
