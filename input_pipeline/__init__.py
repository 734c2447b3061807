"""Input pipeline of ait-jax: grain sources, transforms and loaders for AiT.

Independent of `ait_jax` but for its numpy task code (mask crops, object
sequences); numpy, PIL, pycocotools, grain; TFDS only for the TFDS source.
Batches are dicts of numpy arrays; images NHWC float32.

Sources (grain random-access: `len(source)`, `source[i]` -> record dict):
  NyuDepthSource(root, split='train'|'test', list_file=None, load_image=True)
      NYUv2 in the BTS layout the reference reads; depth in metres.
  TfdsNyuDepthSource(split='train', data_dir=None, name='nyu_depth_v2')
      `tfds.data_source` (ArrayRecord, no TensorFlow); also reads
      'ait_nyu_depth_v2', the BTS split written by `tfds_builders.prepare`.
  TfdsCocoInstancesSource(split='train', data_dir=None,
                          name='ait_coco_instances', with_annotations=True)
      COCO with masks as written by `tfds_builders.prepare`.
  CocoInstancesSource(ann_file, image_dir, *, train=True, min_size=32,
                      skip_bad_annotations=False)
      COCO images, boxes, labels, crowd flags, polygon/RLE masks.
  CocoMaskSource(ann_file, *, mask_size=64)
      box-cropped binary instance masks for the mask tokenizer ("maskcoco").
  CocoMaskEvalSource(ann_file, *, mask_size=64)
      every annotation's crop as the reference's mask-AP evaluation of that
      tokenizer makes it, with its integer box, class and image size.

Loaders (`LoaderOptions(global_batch_size, seed=0, num_epochs=None,
worker_count=0, worker_buffer_size=2, read_threads=1, read_buffer_size=2,
process_index=None, process_count=None, skip_bad_records=False,
max_consecutive_bad=16)`; `train=False` gives one ordered pass padded to
whole batches, with a boolean `valid`):
  make_depth_loader(source, *, train, options, crop_size=(480, 480),
                    boundary_crop=None, resize_to=None)
      -> image (B,H,W,3) in [0,1], depth (B,H,W,1) metres.
  make_depth_tokenizer_loader(source, *, train, options, crop_size=(480, 480),
                              boundary_crop=(41, 0, 601, 480), mask_ratio=0.5,
                              mask_patch=16, resize_to=None)
      -> depth (target), masked_depth (input, training) (B,H,W,1).
  make_insseg_loader(source, *, train, options, image_size=(640, 640),
                     ratio_range=(0.1, 3.0), max_instances=100,
                     mask_crop_size=64, keep_masks=False, sequences=None)
      -> train: image (B,S,S,3) normalised, img_shape (B,2), boxes (B,M,4)
         x1,y1,x2,y2 px, labels (B,M) (-1 pad), num_instances (B,),
         mask_crops (B,M,64,64), [masks (B,M,S,S) uint8];
         with `sequences` (a DetTask or InsSegTask with seq_aug), each
         image's training sequences from its own seeded generator
         (transforms_sequences): input_seq (B,L-1), target_seq (B,L),
         [seq_mask_crops (B,Q,m,m) uint8, seq_has_mask (B,Q)];
         eval: image, img_shape, ori_shape, scale_factor (B,4), image_id.
  make_mask_tokenizer_loader(source, *, train, options)
      -> mask (B,S,S,1) in {0,1}, box, image_id, ann_id.
  make_multitask_loader({task: loader, ...}) -> {task: batch} every step.
  make_loader(source, ops, *, train, options, name) for any other mix.

Every loader is an iterator with `get_state()` / `set_state(state)` (small
JSON-able dicts: save one per process with the train state; restoring gives
exactly the next batch, with any worker count), `num_skipped` / `skipped` (bad
data skipped and why, with `skip_bad_records` or `skip_bad_annotations`),
`batch_size` (per process), `num_batches` (None when infinite), `close()` (or
`with`). Bad data otherwise raises `DataError` naming the file. The same seed
gives the same batches whatever the worker count.

Synthetic data in the real formats: `python -m input_pipeline.synthetic --out
DIR` (or `synthetic.generate(...)`). TFDS ArrayRecord datasets from raw files:
`tfds_builders.prepare(name, raw_dir, data_dir)`. Benchmark: `python -m
input_pipeline.bench --task depth|insseg --workers N`.
"""

from input_pipeline.errors import DataError
from input_pipeline.loader import Loader
from input_pipeline.loader import LoaderOptions
from input_pipeline.loader import make_loader
from input_pipeline.loader import make_multitask_loader
from input_pipeline.pipelines import make_depth_loader
from input_pipeline.pipelines import make_depth_tokenizer_loader
from input_pipeline.pipelines import make_insseg_loader
from input_pipeline.pipelines import make_mask_tokenizer_loader
from input_pipeline.sources_coco import CocoInstancesSource
from input_pipeline.sources_coco import CocoMaskEvalSource
from input_pipeline.sources_coco import CocoMaskSource
from input_pipeline.sources_nyu import NyuDepthSource
from input_pipeline.sources_tfds import TfdsCocoInstancesSource
from input_pipeline.sources_tfds import TfdsNyuDepthSource
