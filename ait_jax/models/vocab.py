"""The vocabulary AiT's transformer shares between its tasks.

One id space, in this order (the reference's names for the offsets):

  [0, num_bins]                     box coordinate bins
  [class_offset, special_offset)    object classes
  special_offset                    a special token (end of sequence in the reference)
  noise_label                       the class of Pix2Seq noise objects
  [mask_offset, depth_offset)       instance-mask VQ codes
  [depth_offset, enddepth_offset)   depth VQ codes
  [enddepth_offset, size)           unused (the insseg and joint configs add 128)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class Vocab:
  num_bins: int
  num_classes: int
  num_mask_codes: int
  num_depth_codes: int
  size: int  # the reference's num_vocal: rows of voc_embed and of the logits

  def __post_init__(self):
    if self.size < self.enddepth_offset:
      raise ValueError(
          f"vocabulary size {self.size} is smaller than the {self.enddepth_offset} ids "
          f"its ranges need (num_bins={self.num_bins}, num_classes={self.num_classes}, "
          f"num_mask_codes={self.num_mask_codes}, "
          f"num_depth_codes={self.num_depth_codes}).")

  @classmethod
  def from_reference(cls, kwargs: Mapping) -> Vocab:
    """From ARTransformer keywords (num_vocal, num_bins, num_classes, num_embeddings,
    num_embeddings_depth); other keys are ignored."""
    return cls(num_bins=int(kwargs["num_bins"]), num_classes=int(kwargs["num_classes"]),
               num_mask_codes=int(kwargs["num_embeddings"]),
               num_depth_codes=int(kwargs["num_embeddings_depth"]),
               size=int(kwargs["num_vocal"]))

  @property
  def class_offset(self) -> int:
    return self.num_bins + 1

  @property
  def special_offset(self) -> int:
    return self.class_offset + self.num_classes

  @property
  def noise_label(self) -> int:
    return self.special_offset + 1

  @property
  def mask_offset(self) -> int:
    return self.special_offset + 2

  @property
  def depth_offset(self) -> int:
    return self.mask_offset + self.num_mask_codes

  @property
  def enddepth_offset(self) -> int:
    return self.depth_offset + self.num_depth_codes

  @property
  def bins(self) -> slice:
    return slice(0, self.num_bins + 1)

  @property
  def classes(self) -> slice:
    return slice(self.class_offset, self.special_offset)

  @property
  def mask_codes(self) -> slice:
    return slice(self.mask_offset, self.depth_offset)

  @property
  def depth_codes(self) -> slice:
    return slice(self.depth_offset, self.enddepth_offset)

  def offsets(self) -> dict[str, int]:
    """The reference's offset attributes by name (as vocab_config.json lists them)."""
    names = ("class_offset", "special_offset", "noise_label", "mask_offset",
             "depth_offset", "enddepth_offset")
    return {n: getattr(self, n) for n in names} | {"num_vocal": self.size}
