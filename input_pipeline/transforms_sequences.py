"""Detection and instance-segmentation sequences, built per record (grain).

The reference's heads build their sequences in the training step (`get_seq`):
the real objects shuffled, Pix2Seq noise objects up to `num_query` (`seq_aug`),
the input's class slots corrupted, and for instance segmentation every object's
mask crop from the FULL ground-truth masks (duplicates' crops in their jittered
boxes). Here that happens in the input pipeline, with the task modules' numpy
code (`ait_jax.tasks.detection.object_sequences`,
`ait_jax.tasks.insseg.make_sequences`) and the record's own generator: the
loader's per-position seeded one, after the augmentation ops have drawn from
it, so a batch stays a function of (seed, process, position) and resumes
exactly. It runs after `Pad` (crops read the padded masks, noise boxes the
unpadded `img_shape`) and before `PadInstances`, which drops the full masks.

With `seq_aug` every image has `num_query` objects, so the arrays have fixed
shapes and records batch. Without it the reference pads the sequences to the
batch's largest object count, which one record cannot know: refused.

Keys added (L = num_query * (5 + T), T mask tokens, T = 0 for detection):
  input_seq (L - 1,) int32: the sequence, class slots corrupted, last cut;
  target_seq (L,) int32: -100 where there is no loss; mask slots still 0;
  instance segmentation only, for `insseg.add_mask_codes`:
  seq_mask_crops (num_query, S, S) uint8: each object slot's binary crop
      (zeros for the bad noise boxes);
  seq_has_mask (num_query,) bool: slots holding an object.
"""

import grain
import numpy as np

from ait_jax.tasks import detection
from ait_jax.tasks import insseg
from input_pipeline.transforms_common import Record


class ObjectSequences(grain.transforms.RandomMap):
  """One record's sequences for a `DetTask` or `InsSegTask` (see above)."""

  def __init__(self, task: "detection.DetTask | insseg.InsSegTask"):
    if not isinstance(task, (detection.DetTask, insseg.InsSegTask)):
      raise TypeError(f"sequences need a DetTask or InsSegTask, got {task!r}")
    if not task.seq_aug:
      raise ValueError(
          "per-record sequences need seq_aug=True (every image then has "
          "num_query objects); without it the reference pads to the batch's "
          "largest object count: build those per batch with "
          "ait_jax.tasks.detection.object_sequences")
    self.task = task

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    boxes, labels = [record["boxes"]], [record["labels"]]
    img_shapes = np.asarray(record["img_shape"])[None]
    out = dict(record)
    if isinstance(self.task, insseg.InsSegTask):
      seqs = insseg.make_sequences(self.task, boxes, labels, [record["masks"]],
                                   img_shapes, rng=rng)
      out["seq_mask_crops"] = seqs.crops[0]
      out["seq_has_mask"] = seqs.has_mask[0]
    else:
      seqs = detection.object_sequences(self.task, boxes, labels, img_shapes,
                                        rng=rng)
    out["input_seq"] = seqs.input_seq[0]
    out["target_seq"] = seqs.target_seq[0]
    return out
