"""Demo: AiT instance segmentation, tiny, on the synthetic COCO-format dataset (CPU).

Shaped like the reference's `swinv2b_640reso_inssegonly` (soft mask tokens, Pix2Seq
sequence augmentation, objects in random order), scaled down: 128x128 images, a 3-stage
SwinV2, a 2-layer decoder, 10 objects of 4 box bins (64 bins of 2 pixels) + class + 16
mask codes. Trains the demo mask tokenizer (configs/demo_vqvae_insseg.py) into
WORKDIR/tokenizer_insseg first.

Four changes from the reference's recipe let a model trained from scratch for minutes
on CPU find objects; without them its held-out AP stays near 0.
- one flat shape per image (`data.synthetic.coco_scenes='one_shape'`). The objects of a
  sequence come in random order, as in the reference, so its first coordinate is the
  top edge of any one of them. With 1-3 shapes per image ('shapes') this choice is
  learned last: after 6000 steps the first coordinate's cross-entropy (3.8) was no
  lower than the entropy of all top edges (3.5) while the next three had fallen to
  2.6, 1.8 and 1.2, so decoded boxes begin at random rows; seven such runs (learning
  rate 3e-4 to 1e-3, 3000 to 6000 steps) ended between 0.01 and 0.12 box AP50 on 256
  held-out images. With one shape, three runs of 3000-5000 steps reached a mask AP50
  of 0.51, 0.43 and 0.10 (mask AP 0.17, 0.15, 0.03): the loss drops once the model
  finds the shape, which happened between steps 1500 and 3500. This config from an
  empty workdir (6000 steps): mask AP50 0.105, mask AP 0.025. The rooms that the
  depth demo uses are harder still (box AP50 0.02 after 1500 steps);
- no transformer encoder layers (the reference's ARTransformer allows 0): with two, on
  single-object scenes, the memory lost most of what tells object cells from background
  cells (a linear probe fell from 99% to 90% against a base rate of 87%): the class can
  be read off a global colour through uniform cross-attention, and nothing pushes the
  decoder to look for objects;
- no large-scale jitter (ratio_range 1): at (0.1, 3.0) a 1500-step run's box AP50
  fell from 0.11 to 0.01;
- 64 box bins of 2 pixels: 100 bins did worse, 32 no better.
The held-out split has 256 images, so that its AP varies little from the images drawn.

The image side is a multiple of 64, so that no stage pads its windows: the reference's
SwinV2 attends to the zero padding unmasked, and trained from scratch at 96x96 (stages
padded from 12 to 16 and 6 to 8) its features lost nearly all dependence on the image.
"""

from ait_jax.train import config_base

NUM_BINS, NUM_CLASSES, NUM_MASK_CODES, NUM_DEPTH_CODES = 64, 3, 32, 32
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
          nhead=4, dim_feedforward=128, num_encoder_layers=0, num_decoder_layers=2,
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
  c.tasks.insseg.ratio_range = (1.0, 1.0)
  c.data.synthetic.update(num_train=320, num_test=256, height=240, width=320,
                          coco_scenes="one_shape")
  c.data.worker_count = 1
  c.tokenizers.insseg = config_base.tokenizer_source("configs/demo_vqvae_insseg.py",
                                                     train=True)
  c.total_steps = 6000
  c.optimizer.update(lr=1e-3, weight_decay=0.05, layer_decay_rate=0.9,
                     layer_decay_depths=(1, 1, 2))
  c.schedule.update(name="linear_annealing", warmup_steps=50, warmup_ratio=0.1)
  c.checkpoint.update(every_steps=1000, keep=2)
  c.log_every_steps = 50
  c.lock()
  return c
