"""The config schema shared by every experiment file in configs/.

An experiment file's `get_config()` starts from `ait_config()` (stage 2, AiT) or
`tokenizer_config()` (stage 1, a VQ-VAE), fills in the reference's numbers and returns
the config locked, so that a misspelt key (in the file or on the command line) is an
error naming it.

Sections:
* `model`: the reference config's `model` dict, as the reference writes it (AiT:
  type/backbone/transformer/task_heads; tokenizer: the keywords of the stage-1
  `VQVAE`). `ait_jax.checkpoint.ait.ait_from_reference_config` and
  `ait_jax.checkpoint.vqvae.vqvae_from_reference_kwargs` build the modules from it:
  one source of truth for the architecture.
* `tasks`: per task, its data (source, batch size, crops) and test-time options.
* `tokenizers` (stage 2): where each frozen tokenizer comes from.
* `optimizer`, `schedule`, `total_steps`, `grad_accum_steps`, `compute_dtype`.
* `mesh`: data x fsdp x tensor sizes, -1 inferred from the device count.
* `data`, `checkpoint`, logging, evaluation and profiling intervals.
"""

import ml_collections

STAGES = ("ait", "tokenizer")
NYU_SOURCES = ("nyu", "synthetic")

# The reference's no-decay names (SwinLayerDecayOptimizerConstructor's paramwise_cfg).
NO_DECAY_NAMES = ("relative_position_bias_table", "rpe_mlp", "logit_scale", "det_embed",
                  "voc_embed", "enc_embed", "dec_embed", "mask_embed")


def _base(stage: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0
  c.total_steps = 1000
  c.grad_accum_steps = 1
  # 'float32' or 'bfloat16': the modules' compute dtype; parameters stay float32.
  c.compute_dtype = "float32"
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-4, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
      grad_clip_norm=0.0, layer_decay_rate=1.0, layer_decay_depths=(),
      no_decay_names=()))
  c.schedule = ml_collections.ConfigDict(dict(
      name="constant", warmup_steps=0, warmup_ratio=0.1, boundaries=(), gamma=0.1,
      min_lr_ratio=0.01, decay_rate=0.98, decay_interval=500, steps_per_epoch=0,
      lr_min=1e-6))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.data = ml_collections.ConfigDict(dict(
      # Data shards (each a grain loader's process share); 0: one per process. The
      # same number on any process count gives the same global batches.
      num_shards=0,
      worker_count=0,
      read_threads=1,
      skip_bad_records=False,
      # Where the 'synthetic' sources are generated (empty: WORKDIR/data/synthetic).
      synthetic_dir="",
      # coco_scenes: the COCO layout's scenes, 'rooms' (as the NYU layout's), 'shapes'
      # (1-3 flat shapes on a plain background) or 'one_shape' (one of them);
      # input_pipeline.synthetic.SCENES.
      synthetic=ml_collections.ConfigDict(dict(num_train=160, num_test=16, height=480,
                                                width=640, coco_scenes="rooms")),
  ))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3,
                                                async_save=True))
  c.log_every_steps = 20
  c.eval_every_steps = 0  # 0: evaluate once, at the end
  c.eval_at_end = True
  c.progress_bar = True
  c.profile = ml_collections.ConfigDict(dict(start_step=-1, num_steps=3))
  return c


def nyu_source(kind: str = "nyu", root: str = "data/nyu_depth_v2",
               train_list: str = "", test_list: str = "") -> ml_collections.ConfigDict:
  """An NYUv2 source in the BTS layout; 'synthetic' generates one first."""
  return ml_collections.ConfigDict(dict(kind=kind, root=root, train_list=train_list,
                                        test_list=test_list))


def ait_config() -> ml_collections.ConfigDict:
  """Stage 2 defaults; the experiment sets `model`, `tasks` and `tokenizers`."""
  c = _base("ait")
  c.model = ml_collections.ConfigDict()
  c.tasks = ml_collections.ConfigDict()
  c.tokenizers = ml_collections.ConfigDict()
  c.init = ml_collections.ConfigDict(dict(
      # A reference SwinV2 state_dict (.npz/.safetensors, e.g. the converted
      # swin_v2_base_densesimmim.pth) for the backbone.
      backbone="",
      # A reference AiT state_dict (the reference's `load_from`) or an ait-jax AiT
      # workdir (its latest checkpoint), for all parameters it holds whose shapes
      # match, e.g. a detection model to start instance segmentation from.
      model=""))
  c.optimizer.update(grad_clip_norm=10.0, no_decay_names=NO_DECAY_NAMES)
  return c


def depth_task(batch_size: int, *, source=None, crop_size=(480, 480),
               eval_batch_size: int = 2) -> ml_collections.ConfigDict:
  """The depth task's data: the reference's `nyudepthv2` dataset settings."""
  return ml_collections.ConfigDict(dict(
      batch_size=batch_size,              # global (the reference's samples_total_gpu)
      eval_batch_size=eval_batch_size,    # global
      source=source or nyu_source(),
      crop_size=tuple(crop_size),
      boundary_crop=(),                   # (x0, y0, x1, y1); () for none
      resize_to=(),                       # (h, w) before cropping; demos only
      eval_max_batches=0,                 # 0: the whole test split
      eval_baseline=False,                # also score the training-set mean depth
  ))


def tokenizer_source(name: str, train: bool, path: str = "") -> ml_collections.ConfigDict:
  """Where a stage-2 run gets the frozen tokenizer of one task.

  `checkpoint`: an ait-jax stage-1 workdir, or a reference VQ-VAE state_dict
  (.npz/.safetensors). `config`: the stage-1 config file, trained into
  WORKDIR/tokenizer_<task> first when `checkpoint` is empty and `train_if_missing`.
  """
  return ml_collections.ConfigDict(dict(checkpoint=path, config=name,
                                        train_if_missing=train))


def tokenizer_config() -> ml_collections.ConfigDict:
  """Stage 1 defaults; the experiment sets `task`, `model` (the reference VQVAE
  keywords) and `tasks.<task>` (its data)."""
  c = _base("tokenizer")
  c.task = "depth"
  c.model = ml_collections.ConfigDict()
  c.tasks = ml_collections.ConfigDict()
  # 'random': the reference's N(0, 1) codebook, whose codes unused by the first batch
  # never return (its EMA has no bias correction). 'data': codes drawn from the
  # encoder's features of the first batch, with EMA statistics consistent with them
  # (a departure from the reference for short runs).
  c.codebook_init = "random"
  c.optimizer.update(name="adam", lr=3e-4)
  return c


def depth_tokenizer_data(batch_size: int, *, source=None, crop_size=(480, 480),
                         eval_batch_size: int = 1) -> ml_collections.ConfigDict:
  """The depth VQ-VAE's data (vae/dataset/nyudepthv2.py)."""
  return ml_collections.ConfigDict(dict(
      batch_size=batch_size,
      eval_batch_size=eval_batch_size,
      source=source or nyu_source(),
      crop_size=tuple(crop_size),
      boundary_crop=(41, 0, 601, 480),
      mask_ratio=0.5,
      mask_patch=16,
      resize_to=(),
      eval_max_batches=0,
  ))


def coco_source(kind: str = "coco", root: str = "data/coco") -> ml_collections.ConfigDict:
  """COCO 2017 in its usual layout (annotations/, train2017/, val2017/)."""
  return ml_collections.ConfigDict(dict(kind=kind, root=root))


def coco_task(batch_size: int, *, source=None, image_size=(640, 640),
              eval_batch_size: int = 8) -> ml_collections.ConfigDict:
  """Detection / instance segmentation data: large-scale jitter, as the reference's
  `det_train_pipeline` / `insseg_train_pipeline`."""
  return ml_collections.ConfigDict(dict(
      batch_size=batch_size,
      eval_batch_size=eval_batch_size,
      source=source or coco_source(),
      image_size=tuple(image_size),
      ratio_range=(0.1, 3.0),
      max_instances=100,
      eval_max_batches=0,
  ))


def mask_tokenizer_data(batch_size: int, *, source=None,
                        eval_batch_size: int = 512) -> ml_collections.ConfigDict:
  """The instance-mask VQ-VAE's data: box-cropped COCO masks ("maskcoco")."""
  return ml_collections.ConfigDict(dict(batch_size=batch_size,
                                        eval_batch_size=eval_batch_size,
                                        source=source or coco_source(),
                                        eval_max_batches=0))
