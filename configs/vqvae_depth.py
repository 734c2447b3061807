"""The depth tokenizer (stage 1): VQ-VAE on NYUv2 depth with masked-patch augmentation.

Reference: vae/configs/depth/ait_depth_vqvae.py, trained by
vae/train_depth_vqvae_dist.py: 480x480 crops of the boundary-cropped frames, 15x15
tokens from 128 codes, MSE on valid pixels, 50% of 16-px patches zeroed in the input;
Adam 3e-4 with ExponentialLR(0.98) stepped every 500 iterations of each epoch, 20
epochs of the 24231 training frames at batch 8 (3028 steps per epoch).
"""

from ait_jax.train import config_base

STEPS_PER_EPOCH = 24231 // 8


def get_config():
  c = config_base.tokenizer_config()
  c.task = "depth"
  c.model = dict(image_size=480, num_resnet_blocks=2, downsample_ratio=32,
                 num_tokens=128, codebook_dim=512, hidden_dim=16, use_norm=False,
                 channels=1, train_objective="regression", max_value=10.0,
                 residul_type="v1", loss_type="mse_ignore_zero", ema_decay=0.99,
                 commitment_cost=0.25)
  c.tasks.depth = config_base.depth_tokenizer_data(8, crop_size=(480, 480),
                                                   eval_batch_size=8)
  c.tasks.depth.source.root = "data/nyu_depth_v2"
  c.tasks.depth.update(boundary_crop=(41, 0, 601, 480), mask_ratio=0.5, mask_patch=16)
  c.total_steps = 20 * STEPS_PER_EPOCH
  c.optimizer.update(name="adam", lr=3e-4, weight_decay=0.0, grad_clip_norm=0.0)
  c.schedule.update(name="exp", decay_rate=0.98, decay_interval=500,
                    steps_per_epoch=STEPS_PER_EPOCH)
  c.checkpoint.every_steps = STEPS_PER_EPOCH
  c.eval_every_steps = STEPS_PER_EPOCH
  c.log_every_steps = 100
  c.lock()
  return c
