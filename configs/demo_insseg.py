"""Demo: AiT instance segmentation, tiny, on the synthetic COCO-format dataset (CPU).

Shaped like the reference's `swinv2b_640reso_inssegonly` (soft mask tokens, Pix2Seq
sequence augmentation), scaled down: 128x128 large-scale-jitter crops, a 3-stage SwinV2,
a 2+2-layer transformer, 10 objects of 4 box bins + class + 16 mask codes. Trains the
demo mask tokenizer (configs/demo_vqvae_insseg.py) into WORKDIR/tokenizer_insseg first.

The image side is a multiple of 64, so that no stage pads its windows: the reference's
SwinV2 attends to the zero padding unmasked, and trained from scratch at 96x96 (stages
padded from 12 to 16 and 6 to 8) its features lost nearly all dependence on the image
(their spread across images fell from 0.55 to 0.09 of their scale), which 128x128 does
not (0.71). At this size and length the model learns the sequence format, the classes
of given boxes and the mask codes, but not yet to find objects: its cross-attention
from the first position stays near uniform, and its mask AP on the held-out images is
about 0 (also after 3000 steps, and at 64x64 or with a 4-stage backbone).
"""

from ait_jax.train import config_base

NUM_BINS, NUM_CLASSES, NUM_MASK_CODES, NUM_DEPTH_CODES = 100, 3, 32, 32
NUM_VOCAL = NUM_BINS + 1 + NUM_CLASSES + 2 + NUM_MASK_CODES + NUM_DEPTH_CODES
NUM_QUERY = 10


def get_config():
  c = config_base.ait_config()
  c.model = dict(
      type="AiT",
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
          dec_length=NUM_QUERY * 21 + 1, n_rows=8, n_cols=8, pos_enc="sine",
          pred_eos=False, soft_vae=True, soft_transformer=True, top_p=0.3),
      task_heads=dict(
          insseg=dict(
              type="InsSegHead", task_id=1, loss_weight=1.0, num_classes=NUM_CLASSES,
              num_query=NUM_QUERY, num_bins=NUM_BINS, coord_norm="abs", norm_val=128,
              sync_cls_avg_factor=True,
              vae_cfg=dict(type="VQVAE", token_length=16, mask_size=32,
                           embedding_dim=32, hidden_dim=32, num_resnet_blocks=1,
                           num_embeddings=NUM_MASK_CODES),
              mask_weight=0.2, decoder_loss_weight=5.0, max_obj_decoderloss=NUM_QUERY,
              seq_aug=True)))
  c.tasks.insseg = config_base.coco_task(
      8, source=config_base.coco_source("synthetic"), image_size=(128, 128),
      eval_batch_size=4)
  c.tasks.insseg.max_instances = NUM_QUERY
  c.data.synthetic.update(num_train=320, num_test=16, height=240, width=320)
  c.data.worker_count = 1
  c.tokenizers.insseg = config_base.tokenizer_source("configs/demo_vqvae_insseg.py",
                                                     train=True)
  c.total_steps = 600
  c.optimizer.update(lr=1e-3, weight_decay=0.05, layer_decay_rate=0.9,
                     layer_decay_depths=(1, 1, 2))
  c.schedule.update(name="linear_annealing", warmup_steps=50, warmup_ratio=0.1)
  c.checkpoint.update(every_steps=200, keep=2)
  c.log_every_steps = 25
  c.lock()
  return c
