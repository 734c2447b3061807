"""AiT joint instance segmentation + depth, SwinV2-B, one shared model.

Reference: ait/configs/swinv2b_640reso_joint.py
(COCO 2017 at 640x640, large-scale jitter).
The backbone starts from the reference's `swin_v2_base_densesimmim.pth` converted to
.npz (--config.init.backbone=PATH). The reference trains with fp16 autocast; here the
compute dtype is bfloat16 with float32 parameters.
The reference starts from `load_from = 'ait_det_swinv2b_wodec.pth'`: pass it
(or the workdir of configs/swinv2b_640reso_detonly.py trained here) as
--config.init.model=PATH.
"""

from ait_jax.train import config_base

NUM_BINS, NUM_CLASSES, NUM_EMBEDDINGS, NUM_EMBEDDINGS_DEPTH = 2000, 80, 128, 128
NUM_EMBEDDINGS_OTHERS = 128  # other tasks' tokens
NUM_VOCAL = (NUM_BINS + 1 + NUM_CLASSES + 2 + NUM_EMBEDDINGS + NUM_EMBEDDINGS_DEPTH
             + NUM_EMBEDDINGS_OTHERS)


def get_config():
  c = config_base.ait_config()
  c.model = dict(
      type="AiT", padto=640,
      backbone=dict(
          type="SwinV2TransformerRPE2FC", pretrain_img_size=192, embed_dim=128,
          depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=[30, 30, 30, 15],
          use_shift=[True, True, True, True], pretrain_window_size=[12, 12, 12, 6],
          ape=False, drop_path_rate=0.3, patch_norm=True, use_checkpoint=False,
          out_indices=(3,),
          init_cfg=dict(type="Pretrained",
                        checkpoint="swin_v2_base_densesimmim.pth")),
      transformer=dict(
          type="ARTransformer", in_chans=1024, d_model=256, drop_path=0.1,
          drop_out=0.1, nhead=8, dim_feedforward=1024, num_encoder_layers=6,
          num_decoder_layers=6, num_vocal=NUM_VOCAL, num_bins=NUM_BINS,
          num_classes=NUM_CLASSES, num_embeddings=NUM_EMBEDDINGS,
          num_embeddings_depth=NUM_EMBEDDINGS_DEPTH, dec_length=2100, n_rows=20,
          n_cols=20, pos_enc="sine", pred_eos=False,
          soft_vae=True, soft_transformer=True, top_p=0.3),
      task_heads=dict(
          insseg=dict(
              type="InsSegHead", task_id=1, loss_weight=1.0, num_classes=NUM_CLASSES,
              num_bins=NUM_BINS, coord_norm="abs", norm_val=640,
              sync_cls_avg_factor=True,
              vae_cfg=dict(type="VQVAE", token_length=16, mask_size=64,
                           embedding_dim=512, hidden_dim=128, num_resnet_blocks=2,
                           num_embeddings=NUM_EMBEDDINGS, pretrained="vqvae_insseg.pt",
                           freeze=True),
              mask_weight=0.2,
              decoder_loss_weight=5.0, max_obj_decoderloss=100, seq_aug=True),
          depth=dict(
              type="DepthHead", task_id=2, loss_weight=0.2,
              depth_token_offset=NUM_BINS + 1 + NUM_CLASSES + 2 + NUM_EMBEDDINGS,
              vae_cfg=dict(type="VQVAE", use_norm=False, token_length=15 * 15,
                           mask_size=480, embedding_dim=512, hidden_dim=256,
                           num_resnet_blocks=2,
                           num_embeddings=NUM_EMBEDDINGS_DEPTH,
                           pretrained="vqvae_depth.pt", freeze=True),
              decoder_loss_weight=1.0,
              soft_vae=True)))
  c.tasks.insseg = config_base.coco_task(60, eval_batch_size=8)
  c.tasks.depth = config_base.depth_task(4, crop_size=(480, 480), eval_batch_size=8)
  c.tasks.depth.source.root = "data/nyu_depth_v2"
  c.tokenizers.insseg = config_base.tokenizer_source("configs/vqvae_insseg.py",
                                                     train=False)
  c.tokenizers.depth = config_base.tokenizer_source("configs/vqvae_depth.py", train=False)
  c.total_steps = 302875
  c.optimizer.update(name="adamw", lr=8e-4, weight_decay=0.05, grad_clip_norm=10.0,
                     layer_decay_rate=0.85, layer_decay_depths=(2, 2, 18, 2))
  c.schedule.update(name="linear_annealing", min_lr_ratio=0.01, warmup_steps=12115,
                    warmup_ratio=0.1)
  c.compute_dtype = "bfloat16"
  c.checkpoint.every_steps = 12115
  c.eval_every_steps = 302875
  c.log_every_steps = 20
  c.lock()
  return c
