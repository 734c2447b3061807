"""Demo: joint AiT instance segmentation + depth in one tiny model (CPU).

Shaped like the reference's `swinv2b_640reso_joint`: one model, both heads, both
frozen tokenizers, every step one batch of each task; depth crops are padded to the
instance-segmentation size (`padto`) as the reference pads 480 to 640. Trains both
demo tokenizers first when the workdir has none.
"""

from ait_jax.train import config_base

NUM_BINS, NUM_CLASSES, NUM_MASK_CODES, NUM_DEPTH_CODES = 100, 3, 32, 32
NUM_OTHERS = 32  # the unused tail, as the reference's num_embeddings_others
NUM_VOCAL = NUM_BINS + 1 + NUM_CLASSES + 2 + NUM_MASK_CODES + NUM_DEPTH_CODES + NUM_OTHERS
NUM_QUERY = 10


def get_config():
  c = config_base.ait_config()
  c.model = dict(
      type="AiT", padto=96,
      backbone=dict(
          type="SwinV2TransformerRPE2FC", embed_dim=32, depths=[1, 1, 2],
          num_heads=[1, 2, 4], window_size=[8, 8, 4], use_shift=[True, True, True],
          pretrain_window_size=[8, 8, 4], ape=False, drop_path_rate=0.1,
          patch_norm=True, use_checkpoint=False, out_indices=(2,), rpe_hidden_dim=64),
      transformer=dict(
          type="ARTransformer", in_chans=128, d_model=64, drop_path=0.0, drop_out=0.0,
          nhead=4, dim_feedforward=128, num_encoder_layers=2, num_decoder_layers=2,
          num_vocal=NUM_VOCAL, num_bins=NUM_BINS, num_classes=NUM_CLASSES,
          num_embeddings=NUM_MASK_CODES, num_embeddings_depth=NUM_DEPTH_CODES,
          dec_length=NUM_QUERY * 21 + 1, n_rows=6, n_cols=6, pos_enc="sine",
          pred_eos=False, soft_vae=True, soft_transformer=True, top_p=0.3),
      task_heads=dict(
          insseg=dict(
              type="InsSegHead", task_id=1, loss_weight=1.0, num_classes=NUM_CLASSES,
              num_query=NUM_QUERY, num_bins=NUM_BINS, coord_norm="abs", norm_val=96,
              sync_cls_avg_factor=True,
              vae_cfg=dict(type="VQVAE", token_length=16, mask_size=32,
                           embedding_dim=32, hidden_dim=32, num_resnet_blocks=1,
                           num_embeddings=NUM_MASK_CODES),
              mask_weight=0.2, decoder_loss_weight=5.0, max_obj_decoderloss=NUM_QUERY,
              seq_aug=True),
          depth=dict(
              type="DepthHead", task_id=2, loss_weight=0.2,
              depth_token_offset=NUM_BINS + 1 + NUM_CLASSES + 2 + NUM_MASK_CODES,
              vae_cfg=dict(type="VQVAE", use_norm=False, token_length=64, mask_size=64,
                           embedding_dim=32, hidden_dim=32, num_resnet_blocks=1,
                           num_embeddings=NUM_DEPTH_CODES, tau=0.8),
              decoder_loss_weight=1.0, soft_vae=True)))
  c.tasks.insseg = config_base.coco_task(
      8, source=config_base.coco_source("synthetic"), image_size=(96, 96),
      eval_batch_size=4)
  c.tasks.insseg.max_instances = NUM_QUERY
  c.data.synthetic.update(num_train=320, num_test=16, height=240, width=320)
  c.data.worker_count = 1
  c.tasks.depth = config_base.depth_task(
      4, source=config_base.nyu_source("synthetic"), crop_size=(64, 64),
      eval_batch_size=4)
  c.tasks.depth.update(resize_to=(64, 85), eval_baseline=True)
  c.tokenizers.insseg = config_base.tokenizer_source("configs/demo_vqvae_insseg.py",
                                                     train=True)
  c.tokenizers.depth = config_base.tokenizer_source("configs/demo_vqvae_depth.py",
                                                    train=True)
  c.total_steps = 600
  c.optimizer.update(lr=8e-4, weight_decay=0.05, layer_decay_rate=0.85,
                     layer_decay_depths=(1, 1, 2))
  c.schedule.update(name="linear_annealing", warmup_steps=50, warmup_ratio=0.1)
  c.checkpoint.update(every_steps=200, keep=2)
  c.log_every_steps = 25
  c.lock()
  return c
