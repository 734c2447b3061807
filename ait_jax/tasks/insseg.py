"""Instance segmentation: per-token class weights of the sequence loss."""

import numpy as np

from ait_jax.models.vocab import Vocab


def token_class_weights(vocab: Vocab, *, box_weight: float, cls_weight: float,
                        mask_weight: float) -> np.ndarray:
  """(vocab.size,) float32 weights of the cross-entropy over target tokens.

  The reference's InsSegHead keeps this as the `loss_seq.weight` buffer: `box_weight`
  on the coordinate bins, `cls_weight` on the classes and the noise label,
  `mask_weight` on the mask codes and 1 elsewhere.
  """
  w = np.ones((vocab.size,), np.float32)
  w[vocab.bins] = box_weight
  w[vocab.classes] = cls_weight
  w[vocab.noise_label] = cls_weight
  w[vocab.mask_codes] = mask_weight
  return w
