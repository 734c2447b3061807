"""How good the instance-mask tokenizer is: reconstruction IoU and the COCO mask AP of
ground-truth boxes carrying reconstructed masks.

The AP follows the reference's `vae/utils/eval_coco.py`: each annotation's crop
(`input_pipeline.CocoMaskEvalSource`) is encoded and decoded, the reconstruction is
resized into its integer box with OpenCV's bilinear kernel, thresholded at 0.5 and
pasted into an empty image; it is scored 1.0 with the annotation's class. The AP is
then the ceiling that the tokenizer puts on an AiT model's mask AP: a model that found
every box and class exactly would score it.
"""

import numpy as np

from ait_jax.evaluation import coco
from ait_jax.parallel import distributed
from input_pipeline import resize


def paste_reconstruction(recon, box, height: int, width: int) -> np.ndarray:
  """A (S, S) reconstruction in [0, 1] resized into the integer box `x1, y1, x2, y2`
  of a (height, width) image, as a binary uint8 mask."""
  x1, y1, x2, y2 = (int(v) for v in box)
  inside = resize.resize_bilinear_float(np.asarray(recon, np.float32), y2 - y1, x2 - x1)
  out = np.zeros((height, width), np.uint8)
  out[y1:y2, x1:x2] = inside >= 0.5
  return out


class MaskTokenizerEvaluator:
  """Accumulates one evaluation batch after another; `result` is a collective."""

  def __init__(self, ground_truth, num_codes: int):
    self.coco = coco.CocoEvaluator(ground_truth, iou_types=("segm",),
                                   partial_images=True)
    self.sums = np.zeros(3, np.float64)  # squared error, IoU, count
    self.usage = np.zeros(num_codes, np.int64)

  def add(self, recon, tokens, batch: dict) -> None:
    """Reconstructions (B, S, S) and codes (B, T) of an evaluation batch."""
    for i, valid in enumerate(batch["valid"]):
      if not valid:
        continue
      image_id, label = int(batch["image_id"][i]), int(batch["label"][i])
      h, w = (int(v) for v in batch["image_size"][i])
      if not batch["has_crop"][i]:  # No reconstruction: the object counts as missed.
        self.coco.add(image_id, np.zeros((0, 4)), [], [], np.zeros((0, h, w)))
        continue
      target = batch["mask"][i].reshape(recon[i].shape).astype(np.float32)
      fg, want = recon[i] >= 0.5, target >= 0.5
      union = np.sum(fg | want)
      self.sums += [np.mean((recon[i] - target) ** 2),
                    np.sum(fg & want) / union if union else 1.0, 1]
      np.add.at(self.usage, tokens[i], 1)
      self.coco.add(image_id, batch["box"][i][None], [1.0], [label],
                    paste_reconstruction(recon[i], batch["box"][i], h, w)[None])

  def result(self) -> dict[str, float]:
    """`recon_mse`, `mask_iou` (of the crops), `codebook_usage` and `segm_*` AP."""
    sums = distributed.sum_over_processes(self.sums)
    usage = distributed.sum_over_processes(self.usage)
    if sums[-1] == 0:
      raise ValueError("no mask was evaluated")
    return {"recon_mse": float(sums[0] / sums[-1]), "mask_iou": float(sums[1] / sums[-1]),
            "codebook_usage": float(np.mean(usage > 0)), **self.coco.evaluate()}
