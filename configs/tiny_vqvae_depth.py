"""Tiny depth tokenizer: the smallest stage-1 run, for tests and smoke runs (seconds).

Shaped like vae/configs/depth/ait_depth_vqvae.py: 32x32 crops, 4x4 tokens, 16 codes.
"""

from ait_jax.train import config_base


def get_config():
  c = config_base.tokenizer_config()
  c.task = "depth"
  c.model = dict(image_size=32, num_resnet_blocks=1, downsample_ratio=8, num_tokens=16,
                 codebook_dim=16, hidden_dim=4, use_norm=False, channels=1,
                 train_objective="regression", max_value=10.0, residul_type="v1",
                 loss_type="mse_ignore_zero", ema_decay=0.99, commitment_cost=0.25)
  c.tasks.depth = config_base.depth_tokenizer_data(
      8, source=config_base.nyu_source("synthetic"), crop_size=(32, 32),
      eval_batch_size=4)
  c.tasks.depth.update(boundary_crop=(), resize_to=(32, 43), mask_patch=8)
  c.data.synthetic.update(num_train=16, num_test=4, height=96, width=128)
  c.codebook_init = "data"
  c.total_steps = 20
  c.optimizer.update(name="adam", lr=1e-3)
  c.checkpoint.update(every_steps=10, keep=2)
  c.log_every_steps = 5
  c.lock()
  return c
