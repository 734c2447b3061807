"""Detection and instance segmentation for the trainer (stage 2).

The object sequences are built on the host for each loaded batch (`prepare`, numpy,
with a generator seeded by the seed, the data shard and the batch's position, so a
resumed run builds the same ones); the step encodes the mask crops with the frozen
tokenizer, runs the model and computes the reference head's loss, normalised by its
number of targets over the global batch. Evaluation decodes `num_query` objects per
image and scores COCO box (and mask) AP with pycocotools on process 0.
"""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import input_pipeline as ip
from ait_jax.evaluation import coco
from ait_jax.evaluation import insseg_outputs
from ait_jax.models.ait import AiT
from ait_jax.models.transformer import DET_TASK, INSSEG_TASK
from ait_jax.models.vqvae import VQVAE
from ait_jax.tasks import detection, insseg
from ait_jax.tasks import depth as depth_lib
from ait_jax.train import data as data_lib


@dataclasses.dataclass
class ObjectTask:
  """COCO detection (`name='det'`) or instance segmentation (`name='insseg'`)."""
  cfg: object
  workdir: str
  model: AiT
  tokenizer: VQVAE | None
  head: dict
  name: str = "insseg"

  def __post_init__(self):
    self.task_cfg = self.cfg.tasks[self.name]
    vocab = self.model.transformer.vocab
    if self.name == "insseg":
      self.head_task = insseg.InsSegTask.from_reference(self.head, vocab)
      self.task_id = INSSEG_TASK
      if self.tokenizer.mask_size != self.head_task.mask_size:
        raise ValueError("the insseg tokenizer's mask_size differs from the head's")
    else:
      self.head_task = detection.DetTask.from_reference(self.head, vocab)
      self.task_id = DET_TASK
    self.padto = int(self.cfg.model.get("padto", 0))
    self.resizeto = int(self.cfg.model.get("resizeto", 0))

  # --- data -----------------------------------------------------------------------

  def _source(self, split: str):
    ann, images = data_lib.coco_split(self.cfg.data, self.task_cfg.source, self.workdir,
                                      split, self.name)
    return ip.CocoInstancesSource(ann, images, train=split == "train")

  def train_loader(self, shard: int) -> ip.Loader:
    t = self.task_cfg
    return ip.make_insseg_loader(
        self._source("train"), train=True,
        options=data_lib.loader_options(self.cfg.data, t.batch_size, shard, self.cfg.seed),
        image_size=tuple(t.image_size), ratio_range=tuple(t.ratio_range),
        max_instances=t.max_instances, mask_crop_size=None,
        keep_masks=self.name == "insseg")

  def eval_loader(self, shard: int) -> ip.Loader:
    t = self.task_cfg
    return ip.make_insseg_loader(
        self._source("test"), train=False,
        options=data_lib.loader_options(self.cfg.data, t.eval_batch_size, shard,
                                        self.cfg.seed),
        image_size=tuple(t.image_size))

  def prepare(self, batch: dict, shard: int, position: int) -> dict:
    """The training sequences of one loaded batch (host, numpy)."""
    rng = np.random.default_rng([self.cfg.seed, 7, shard, position])
    n = batch["num_instances"]
    boxes = [b[:k] for b, k in zip(batch["boxes"], n)]
    labels = [lab[:k] for lab, k in zip(batch["labels"], n)]
    out = {"image": batch["image"]}
    if self.name == "insseg":
      masks = [m[:k] for m, k in zip(batch["masks"], n)]
      seqs = insseg.make_sequences(self.head_task, boxes, labels, masks,
                                   batch["img_shape"], rng=rng)
      out.update(crops=seqs.crops, has_mask=seqs.has_mask)
    else:
      seqs = detection.object_sequences(self.head_task, boxes, labels, batch["img_shape"],
                                        rng=rng)
    out.update(input_seq=seqs.input_seq.astype(np.int32),
               target_seq=seqs.target_seq.astype(np.int32))
    return out

  def example_batch(self, batch_size: int) -> dict:
    h, w = self.task_cfg.image_size
    layout = self.head_task.layout
    length = self.head_task.num_query * layout.length
    out = {"image": jax.ShapeDtypeStruct((batch_size, h, w, 3), jnp.float32),
           "input_seq": jax.ShapeDtypeStruct((batch_size, length - 1), jnp.int32),
           "target_seq": jax.ShapeDtypeStruct((batch_size, length), jnp.int32)}
    if self.name == "insseg":
      s, q = self.head_task.mask_size, self.head_task.num_query
      out.update(crops=jax.ShapeDtypeStruct((batch_size, q, s, s), jnp.uint8),
                 has_mask=jax.ShapeDtypeStruct((batch_size, q), jnp.bool_))
    return out

  # --- training -------------------------------------------------------------------

  def loss(self, params, tokenizer_vars, batch, rng):
    images = depth_lib.resize_and_pad(batch["image"], resizeto=self.resizeto,
                                      padto=self.padto)
    input_seq, target_seq = batch["input_seq"], batch["target_seq"]
    if self.name == "insseg":
      input_seq, target_seq = insseg.add_mask_codes(
          self.head_task, input_seq, target_seq, batch["crops"], batch["has_mask"],
          lambda crops: self.tokenizer.apply(tokenizer_vars, crops, method=VQVAE.encode))
    task_ids = jnp.full((images.shape[0],), self.task_id, jnp.int32)
    logits = self.model.apply({"params": params}, images, input_seq, task_ids,
                              train=True, rngs={"dropout": rng})
    if self.name == "insseg":
      out = insseg.sequence_loss(
          self.head_task, logits, target_seq, crops=batch["crops"],
          decode_soft=lambda l: self.tokenizer.apply(tokenizer_vars, l,
                                                     method=VQVAE.decode_soft))
    else:
      out = detection.sequence_loss(logits, target_seq, self.head_task.layout,
                                    loss_weight=self.head_task.loss_weight)
    loss = detection.normalized_loss(out["loss"], out["num_targets"])
    metrics = {f"{self.name}_{k}": v for k, v in out.items()
               if k not in ("loss", "num_targets")}
    return loss, {f"{self.name}_loss": loss, **metrics}

  # --- evaluation -----------------------------------------------------------------

  def predict(self, params, tokenizer_vars, images):
    """Decoded objects of test images: relative tokens, class scores, masks."""
    images = depth_lib.resize_and_pad(images, resizeto=self.resizeto, padto=self.padto)
    key = jax.random.key(0) if self.model.transformer.top_p > 0 else None
    t = self.head_task.layout.mask_token_length
    pred = self.model.apply({"params": params}, images, self.task_id,
                            self.head_task.num_query, t, key, method=AiT.decode_objects)
    out = {"tokens": pred.tokens, "scores": pred.scores}
    if self.name == "insseg":
      b, n = pred.mask_logits.shape[:2]
      logits = pred.mask_logits.reshape((b * n,) + pred.mask_logits.shape[2:])
      if self.model.transformer.soft_transformer:
        masks = self.tokenizer.apply(tokenizer_vars, logits, method=VQVAE.decode_soft)
      else:
        masks = self.tokenizer.apply(tokenizer_vars, jnp.argmax(logits, -1),
                                     method=VQVAE.decode)
      out["masks"] = masks.reshape((b, n) + masks.shape[1:])
    return out

  def eval_start(self):
    ann = os.path.join(self._root(), "annotations", "instances_val2017.json")
    types = ("bbox", "segm") if self.name == "insseg" else ("bbox",)
    return coco.CocoEvaluator(ann, iou_types=types)

  def _root(self) -> str:
    s = self.task_cfg.source
    return (data_lib.synthetic_root(self.cfg.data, self.workdir, "coco")
            if s.kind == "synthetic" else s.root)

  def eval_update(self, evaluator, pred: dict, batch: dict) -> None:
    for i, valid in enumerate(batch["valid"]):
      if not valid:
        continue
      if self.name == "insseg":
        boxes, labels, masks = insseg.instances(
            self.head_task, pred["tokens"][i], pred["scores"][i], pred["masks"][i],
            batch["ori_shape"][i], batch["scale_factor"][i])
      else:
        boxes, labels = detection.detections(self.head_task, pred["tokens"][i],
                                             pred["scores"][i], batch["scale_factor"][i])
        masks = None
      evaluator.add(int(batch["image_id"][i]), boxes[:, :4], boxes[:, 4], labels, masks)

  def eval_result(self, evaluator) -> dict:
    return evaluator.evaluate()

  def eval_batches(self) -> int:
    return self.task_cfg.eval_max_batches

  # --- prediction on image files (--mode predict --input) -----------------------------

  def image_input(self, image: np.ndarray) -> tuple[np.ndarray, dict]:
    """The model input of one uint8 image (H, W, 3) through the test pipeline
    (keep-ratio resize, normalise, pad), and what maps predictions back to it."""
    # Resolved on every process: the synthetic root is a collective, and only process 0
    # writes.
    self._categories  # pylint: disable=pointless-statement
    record = {"image": image}
    for op in ip.transforms_insseg.insseg_test_ops(tuple(self.task_cfg.image_size)):
      record = op.map(record)
    return record["image"], {k: record[k] for k in ("ori_shape", "scale_factor")}

  def write_image_prediction(self, outdir: str, stem: str, image: np.ndarray,
                             pred: dict, meta: dict) -> None:
    """Overlay PNG and COCO JSON (`insseg_outputs`), boxes and masks at the image's
    size (detection: boxes only)."""
    if self.name == "insseg":
      boxes, labels, masks = insseg.instances(
          self.head_task, pred["tokens"], pred["scores"], pred["masks"],
          meta["ori_shape"], meta["scale_factor"])
    else:
      boxes, labels = detection.detections(self.head_task, pred["tokens"], pred["scores"],
                                           meta["scale_factor"])
      masks = None
    names, ids = self._categories
    insseg_outputs.write_instance_prediction(image, boxes[:, :4], labels, boxes[:, 4],
                                             masks, names, outdir, stem, category_ids=ids)

  @functools.cached_property
  def _categories(self) -> tuple[list[str], list[int]]:
    """(class names, category ids) of the test annotations when they are at hand,
    else `class <label>` and the labels themselves."""
    ann = os.path.join(self._root(), "annotations", "instances_val2017.json")
    if os.path.exists(ann):
      with open(ann) as f:
        categories = sorted(json.load(f)["categories"], key=lambda c: c["id"])
      return [c["name"] for c in categories], [c["id"] for c in categories]
    n = self.model.transformer.vocab.num_classes
    return [f"class {i}" for i in range(n)], list(range(n))
