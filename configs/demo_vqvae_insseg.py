"""Demo instance-mask tokenizer: a tiny VQ-VAE on synthetic COCO-format masks (CPU).

The stage-1 run that configs/demo_insseg.py and configs/demo_joint.py train first.
Shaped like vae/configs/insseg/ait_insseg_vqvae.py, scaled down: 32x32 box crops,
4x4 tokens from 32 codes.
"""

from ait_jax.train import config_base


def get_config():
  c = config_base.tokenizer_config()
  c.task = "insseg"
  c.model = dict(image_size=32, num_resnet_blocks=1, downsample_ratio=8, num_tokens=32,
                 codebook_dim=32, hidden_dim=8, channels=1, use_norm=True,
                 train_objective="regression", max_value=1.0, residul_type="v1",
                 loss_type="mse", ema_decay=0.99, commitment_cost=0.25)
  c.tasks.insseg = config_base.mask_tokenizer_data(
      32, source=config_base.coco_source("synthetic"), eval_batch_size=32)
  c.codebook_init = "data"  # the reference's random codebook collapses this early
  c.total_steps = 300
  c.optimizer.update(name="adamw", lr=2e-3, weight_decay=0.0)
  c.schedule.update(name="cosine", warmup_steps=20, warmup_ratio=0.1, lr_min=1e-5)
  c.checkpoint.update(every_steps=100, keep=2)
  c.log_every_steps = 25
  c.lock()
  return c
