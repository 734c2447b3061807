"""Tiny AiT depth: the smallest stage-2 run, for tests and smoke runs of the machinery.

The model of configs/demo_depth.py shrunk further (a 2-stage SwinV2 on 32x32 crops, a
1+1-layer transformer, 4x4 depth tokens from 16 codes) on a small synthetic dataset.
Trains configs/tiny_vqvae_depth.py first unless tokenizers.depth.checkpoint is set.
"""

from ait_jax.train import config_base

NUM_BINS, NUM_CLASSES, NUM_MASK_CODES, NUM_DEPTH_CODES = 10, 3, 16, 16
NUM_VOCAL = NUM_BINS + 1 + NUM_CLASSES + 2 + NUM_MASK_CODES + NUM_DEPTH_CODES


def get_config():
  c = config_base.ait_config()
  c.model = dict(
      type="AiT",
      backbone=dict(
          type="SwinV2TransformerRPE2FC", embed_dim=16, depths=[1, 1],
          num_heads=[1, 2], window_size=[4, 4], use_shift=[True, False],
          pretrain_window_size=[4, 4], ape=False, drop_path_rate=0.1,
          patch_norm=True, use_checkpoint=False, out_indices=(1,), rpe_hidden_dim=16),
      transformer=dict(
          type="ARTransformer", in_chans=32, d_model=32, drop_path=0.1, drop_out=0.1,
          nhead=2, dim_feedforward=64, num_encoder_layers=1, num_decoder_layers=1,
          num_vocal=NUM_VOCAL, num_bins=NUM_BINS, num_classes=NUM_CLASSES,
          num_embeddings=NUM_MASK_CODES, num_embeddings_depth=NUM_DEPTH_CODES,
          dec_length=24, n_rows=4, n_cols=4, pos_enc="sine", pred_eos=False,
          soft_vae=True, soft_transformer=True, top_p=0.0),
      task_heads=dict(
          depth=dict(
              type="DepthHead", task_id=2, loss_weight=1.0,
              depth_token_offset=NUM_BINS + 1 + NUM_CLASSES + 2 + NUM_MASK_CODES,
              vae_cfg=dict(type="VQVAE", use_norm=False, token_length=16, mask_size=32,
                           embedding_dim=16, hidden_dim=16, num_resnet_blocks=1,
                           num_embeddings=NUM_DEPTH_CODES, tau=0.8),
              decoder_loss_weight=1.0, soft_vae=True)))
  c.tasks.depth = config_base.depth_task(
      8, source=config_base.nyu_source("synthetic"), crop_size=(32, 32),
      eval_batch_size=4)
  c.tasks.depth.update(resize_to=(32, 43), eval_baseline=True)
  c.data.synthetic.update(num_train=16, num_test=4, height=96, width=128)
  c.tokenizers.depth = config_base.tokenizer_source("configs/tiny_vqvae_depth.py",
                                                    train=True)
  c.total_steps = 10
  c.optimizer.update(lr=1e-3, weight_decay=0.05, layer_decay_rate=0.9,
                     layer_decay_depths=(1, 1))
  c.schedule.update(name="step", warmup_steps=2, warmup_ratio=0.1, boundaries=(8,))
  c.checkpoint.update(every_steps=5, keep=2)
  c.log_every_steps = 1
  c.lock()
  return c
