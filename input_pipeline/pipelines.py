"""The loaders of each AiT task: sources + transforms + batching.

Defaults are the reference's resolutions; the tiny demo configs pass smaller
sizes. Each function returns a `Loader` of dicts of numpy arrays (images NHWC
float32); see `input_pipeline/__init__.py` for the keys.
"""

from ait_jax.tasks import detection
from ait_jax.tasks import insseg
from input_pipeline import transforms_common
from input_pipeline import transforms_depth
from input_pipeline import transforms_insseg
from input_pipeline import transforms_sequences
from input_pipeline.loader import Loader
from input_pipeline.loader import LoaderOptions
from input_pipeline.loader import make_loader


def make_depth_loader(
    source, *, train: bool, options: LoaderOptions,
    crop_size: tuple[int, int] = (480, 480),
    boundary_crop: tuple[int, int, int, int] | None = None,
    resize_to: tuple[int, int] | None = None) -> Loader:
  """AiT depth: `image` [0, 1] and `depth` metres, (B, H, W, 3) / (B, H, W, 1).

  Training: stripe, flip, random crop `crop_size`, brightness/contrast, gamma,
  HSV (`transforms_depth.depth_train_ops`). Evaluation: the whole frame, with
  `valid` (B,). `resize_to` (h, w) resizes first (demos only; not in the
  reference).
  """
  ops = [] if resize_to is None else [transforms_depth.Resize(*resize_to)]
  if train:
    ops += transforms_depth.depth_train_ops(crop_size, boundary_crop)
  else:
    ops.append(transforms_depth.ToFloat())
  return make_loader(source, ops, train=train, options=options,
                     name="depth")


def make_depth_tokenizer_loader(
    source, *, train: bool, options: LoaderOptions,
    crop_size: tuple[int, int] = (480, 480),
    boundary_crop: tuple[int, int, int, int] | None = (41, 0, 601, 480),
    mask_ratio: float | None = 0.5, mask_patch: int = 16,
    resize_to: tuple[int, int] | None = None) -> Loader:
  """Depth VQ-VAE: `depth` (target) and, in training, `masked_depth` (input).

  Training: boundary crop, flip, random crop, mask augmentation
  (`mask_ratio=None` turns it off: the input is then `depth` itself).
  Evaluation: the whole depth map, with `valid`.
  """
  ops = [transforms_common.DropKeys(["image"])]
  if resize_to is not None:
    ops.append(transforms_depth.Resize(*resize_to))
  if train:
    ops += transforms_depth.depth_tokenizer_train_ops(
        crop_size, boundary_crop, mask_ratio, mask_patch)
  else:
    ops.append(transforms_depth.ToFloat())
  return make_loader(source, ops, train=train, options=options,
                     name="depth_tokenizer")


def make_insseg_loader(
    source, *, train: bool, options: LoaderOptions,
    image_size: tuple[int, int] = (640, 640),
    ratio_range: tuple[float, float] = (0.1, 3.0),
    max_instances: int = 100, mask_crop_size: int | None = 64,
    keep_masks: bool = False,
    sequences: detection.DetTask | insseg.InsSegTask | None = None) -> Loader:
  """Instance segmentation on COCO-format data (`CocoInstancesSource`).

  Training (large-scale jitter): `image` (B, S, S, 3) normalised, `img_shape`
  (B, 2), `boxes` (B, M, 4) pixels `x1, y1, x2, y2`, `labels` (B, M) (-1 pad),
  `num_instances` (B,), `mask_crops` (B, M, c, c) (the head's 64x64 targets;
  `mask_crop_size=None` leaves them out) and, with `keep_masks`, `masks`
  (B, M, S, S) uint8. Evaluation: `image`, `img_shape`, `ori_shape`,
  `scale_factor`, `image_id`, `valid`.

  `sequences` (training only), an `ait_jax.tasks` `DetTask` or `InsSegTask`
  with `seq_aug`, adds each image's training sequences, drawn from its own
  seeded generator from the full masks (`transforms_sequences`): `input_seq`,
  `target_seq` and, for an `InsSegTask`, `seq_mask_crops` (B, num_query, m, m)
  uint8 and `seq_has_mask`.
  """
  if train:
    ops = transforms_insseg.insseg_train_ops(
        image_size, ratio_range, max_instances, mask_crop_size, keep_masks)
    if sequences is not None:
      # After Pad and MaskCrops, before PadInstances drops the full masks.
      last = [isinstance(op, transforms_insseg.PadInstances)
              for op in ops].index(True)
      ops.insert(last, transforms_sequences.ObjectSequences(sequences))
  elif sequences is not None:
    raise ValueError("sequences are training targets; evaluation records "
                     "carry no annotations (pass sequences=None with "
                     "train=False)")
  else:
    ops = transforms_insseg.insseg_test_ops(image_size)
  return make_loader(source, ops, train=train, options=options,
                     name="insseg")


def make_mask_tokenizer_loader(source, *, train: bool,
                               options: LoaderOptions) -> Loader:
  """Instance-mask VQ-VAE (`CocoMaskSource`): `mask` (B, S, S, 1) in {0, 1}.

  Also the source's other keys (`box`, `image_id`, ...; `CocoMaskEvalSource`
  adds what pastes reconstructions back for mask AP), and `valid` in evaluation.
  """
  ops = [transforms_common.AddChannel(["mask"])]
  return make_loader(source, ops, train=train, options=options,
                     name="mask_tokenizer")

