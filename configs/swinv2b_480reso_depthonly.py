"""AiT depth, SwinV2-B, autoregressive with soft tokens.

Reference: ait/configs/swinv2b_480reso_depthonly.py
(AiT, NYUv2 depth at 480x480 crops).
The backbone starts from the reference's `swin_v2_base_densesimmim.pth` converted to .npz
(--config.init.backbone=PATH) and the frozen tokenizer from a stage-1 run of
configs/vqvae_depth.py or the reference's vqvae_depth.pt as .npz
(--config.tokenizers.depth.checkpoint=PATH). The reference trains with fp16 autocast;
here the compute dtype is bfloat16 with float32 parameters.
"""

from ait_jax.train import config_base

NUM_BINS, NUM_CLASSES, NUM_EMBEDDINGS, NUM_EMBEDDINGS_DEPTH = 2000, 80, 128, 128
NUM_VOCAL = NUM_BINS + 1 + NUM_CLASSES + 2 + NUM_EMBEDDINGS + NUM_EMBEDDINGS_DEPTH


def get_config():
  c = config_base.ait_config()
  c.model = dict(
      type="AiT",
      backbone=dict(
          type="SwinV2TransformerRPE2FC", pretrain_img_size=192, embed_dim=128,
          depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=[30, 30, 30, 15],
          use_shift=[True, True, False, False], pretrain_window_size=[12, 12, 12, 6],
          ape=False, drop_path_rate=0.1, patch_norm=True, use_checkpoint=False,
          out_indices=(3,),
          init_cfg=dict(type="Pretrained",
                        checkpoint="swin_v2_base_densesimmim.pth")),
      transformer=dict(
          type="ARTransformer", in_chans=1024, d_model=256, drop_path=0.1,
          drop_out=0.1, nhead=8, dim_feedforward=1024, num_encoder_layers=6,
          num_decoder_layers=6, num_vocal=NUM_VOCAL, num_bins=NUM_BINS,
          num_classes=NUM_CLASSES, num_embeddings=NUM_EMBEDDINGS,
          num_embeddings_depth=NUM_EMBEDDINGS_DEPTH, dec_length=2100, n_rows=15,
          n_cols=15, pos_enc="sine", pred_eos=False,
          soft_vae=True, soft_transformer=True, top_p=0.0),
      task_heads=dict(
          depth=dict(
              type="DepthHead", task_id=2, loss_weight=1.0,
              depth_token_offset=NUM_BINS + 1 + NUM_CLASSES + 2 + NUM_EMBEDDINGS,
              vae_cfg=dict(type="VQVAE", use_norm=False, token_length=15 * 15,
                           mask_size=480, embedding_dim=512, hidden_dim=256,
                           num_resnet_blocks=2,
                           num_embeddings=NUM_EMBEDDINGS_DEPTH, tau=0.8,
                           pretrained="vqvae_depth.pt", freeze=True),
              decoder_loss_weight=1.0,
              soft_vae=True)))
  c.tasks.depth = config_base.depth_task(24, crop_size=(480, 480), eval_batch_size=8)
  c.tasks.depth.source.root = "data/nyu_depth_v2"
  c.tokenizers.depth = config_base.tokenizer_source("configs/vqvae_depth.py", train=False)
  c.total_steps = 25250
  c.optimizer.update(name="adamw", lr=2e-4, weight_decay=0.05, grad_clip_norm=10.0,
                     layer_decay_rate=0.9, layer_decay_depths=(2, 2, 18, 2))
  c.schedule.update(name="step", boundaries=(18180,), gamma=0.1, warmup_steps=500,
                    warmup_ratio=0.1)
  c.compute_dtype = "bfloat16"
  c.checkpoint.every_steps = 5050
  c.eval_every_steps = 25250
  c.log_every_steps = 20
  c.lock()
  return c
