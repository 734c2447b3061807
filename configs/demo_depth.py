"""Demo: AiT depth estimation, tiny, on the synthetic NYU-format dataset (CPU, minutes).

  python -m ait_jax.main --config configs/demo_depth.py --workdir DIR

Generates the synthetic dataset into DIR/data/synthetic if absent, trains the demo
tokenizer (configs/demo_vqvae_depth.py) into DIR/tokenizer_depth if DIR has none, then
trains AiT-P as the reference's `swinv2b_480reso_parallel_depthonly` does (all depth
tokens predicted in parallel, soft-token decoding of the VQ-VAE, its auxiliary SiLog
loss), scaled down: a 3-stage SwinV2 on 64x64 crops of frames resized to 64x85, a
2+2-layer transformer, 8x8 depth tokens from 32 codes. The evaluation runs the
reference's test time (two sliding windows, flip) and reports the NYU metrics on the
full-size test frames, beside those of predicting the training-set mean depth
(`baseline_*`). (At this size the autoregressive model, `parallel=False`, learns to
copy the previous token and barely beats that baseline.)
"""

from ait_jax.train import config_base

NUM_BINS, NUM_CLASSES, NUM_MASK_CODES, NUM_DEPTH_CODES = 100, 3, 32, 32
NUM_VOCAL = NUM_BINS + 1 + NUM_CLASSES + 2 + NUM_MASK_CODES + NUM_DEPTH_CODES


def get_config():
  c = config_base.ait_config()
  c.model = dict(
      type="AiT",
      backbone=dict(
          type="SwinV2TransformerRPE2FC", embed_dim=32, depths=[1, 1, 2],
          num_heads=[1, 2, 4], window_size=[8, 8, 4], use_shift=[True, True, False],
          pretrain_window_size=[8, 8, 4], ape=False, drop_path_rate=0.1,
          patch_norm=True, use_checkpoint=False, out_indices=(2,), rpe_hidden_dim=64),
      transformer=dict(
          type="ARTransformer", in_chans=128, d_model=64, drop_path=0.0, drop_out=0.0,
          nhead=4, dim_feedforward=128, num_encoder_layers=2, num_decoder_layers=2,
          num_vocal=NUM_VOCAL, num_bins=NUM_BINS, num_classes=NUM_CLASSES,
          num_embeddings=NUM_MASK_CODES, num_embeddings_depth=NUM_DEPTH_CODES,
          dec_length=80, n_rows=4, n_cols=4, pos_enc="sine", pred_eos=False,
          parallel=True, soft_vae=True, soft_transformer=False, top_p=0.0),
      task_heads=dict(
          depth=dict(
              type="DepthHead", task_id=2, loss_weight=1.0,
              depth_token_offset=NUM_BINS + 1 + NUM_CLASSES + 2 + NUM_MASK_CODES,
              vae_cfg=dict(type="VQVAE", use_norm=False, token_length=64, mask_size=64,
                           embedding_dim=32, hidden_dim=32, num_resnet_blocks=1,
                           num_embeddings=NUM_DEPTH_CODES, tau=0.8),
              decoder_loss_weight=1.0, soft_vae=True)))
  c.tasks.depth = config_base.depth_task(
      16, source=config_base.nyu_source("synthetic"), crop_size=(64, 64),
      eval_batch_size=4)
  c.tasks.depth.update(resize_to=(64, 85), eval_baseline=True)
  c.data.worker_count = 1
  c.data.synthetic.update(num_train=320, num_test=16, height=240, width=320)
  c.tokenizers.depth = config_base.tokenizer_source("configs/demo_vqvae_depth.py",
                                                    train=True)
  c.total_steps = 900
  c.optimizer.update(lr=1e-3, weight_decay=0.05, layer_decay_rate=0.9,
                     layer_decay_depths=(1, 1, 2))
  c.schedule.update(name="step", warmup_steps=50, warmup_ratio=0.1, boundaries=(720,))
  c.checkpoint.update(every_steps=300, keep=2)
  c.log_every_steps = 25
  c.lock()
  return c
