"""AiT: a SwinV2 encoder feeding the AR transformer that speaks the shared vocabulary.

The frozen VQ-VAE tokenizers are not part of this module: they have their own variables
(stage 1's result) and never receive gradients, so the train state holds them beside
the trainable `AiT` parameters.
"""

import flax.linen as nn

from ait_jax.models import decoding
from ait_jax.models.swin_v2 import SwinV2
from ait_jax.models.transformer import ARTransformer


class AiT(nn.Module):
  backbone: SwinV2
  transformer: ARTransformer

  def features(self, images, train: bool = False):
    """(B, H, W, 3) -> the transformer's memory map, the backbone's first output."""
    return self.backbone(images, train=train)[0]

  def __call__(self, images, input_seq, task_id, train: bool = False):
    """Teacher-forced logits (B, L+1, V) for per-sample task ids (B,)."""
    return self.transformer(self.features(images, train), input_seq, task_id, train=train)

  def decode_depth(self, images, pred_len: int, key=None) -> decoding.DepthPrediction:
    return decoding.decode_depth(self.transformer, self.features(images), pred_len, key)

  def decode_objects(self, images, task_id: int, num_objects: int,
                     mask_token_length: int = 0, key=None) -> decoding.ObjectPrediction:
    return decoding.decode_objects(self.transformer, self.features(images), task_id,
                                   num_objects, mask_token_length, key)
