"""The instance-mask tokenizer (stage 1): VQ-VAE on box-cropped 64x64 COCO masks.

Reference: vae/configs/insseg/ait_insseg_vqvae.py, trained by
vae/train_insseg_vqvae_dist.py: 4x4 tokens from 128 codes, MSE on masks mapped to
[-1, 1]; AdamW 3e-4 without weight decay, timm cosine schedule to 1e-6 with 500 warmup
steps from 3e-7, 20 epochs at batch 512. The reference's t_initial is
ceil(20 * N / 512) for its N extracted masks ("maskcoco"); 33200 assumes the ~850k
instance masks of COCO train2017: set total_steps for your mask count.
"""

from ait_jax.train import config_base


def get_config():
  c = config_base.tokenizer_config()
  c.task = "insseg"
  c.model = dict(image_size=64, num_resnet_blocks=2, downsample_ratio=16,
                 num_tokens=128, codebook_dim=512, hidden_dim=16, channels=1,
                 use_norm=True, train_objective="regression", max_value=1.0,
                 residul_type="v1", loss_type="mse", ema_decay=0.99,
                 commitment_cost=0.25)
  c.tasks.insseg = config_base.mask_tokenizer_data(512, eval_batch_size=512)
  c.total_steps = 33200
  c.optimizer.update(name="adamw", lr=3e-4, weight_decay=0.0, grad_clip_norm=0.0)
  c.schedule.update(name="cosine", warmup_steps=500, warmup_ratio=1e-3, lr_min=1e-6)
  c.checkpoint.every_steps = 1660
  c.eval_every_steps = 1660
  c.log_every_steps = 100
  c.lock()
  return c
