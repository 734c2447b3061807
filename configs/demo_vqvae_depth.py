"""Demo depth tokenizer: a tiny VQ-VAE on synthetic NYU-format depth maps (CPU, minutes).

The stage-1 run that configs/demo_depth.py trains first. Shaped like the reference's
vae/configs/depth/ait_depth_vqvae.py (EMA codebook, masked-patch augmentation, MSE on
valid pixels), scaled down: 64x64 crops of frames resized to 64x85, 8x8 tokens from 32
codes. Two departures make a 1000-step run useful: the codebook starts from encoder
features (`codebook_init='data'`; the reference's random codebook collapses to a code
or two this early) and a quarter of the input patches is masked instead of half.
"""

from ait_jax.train import config_base


def get_config():
  c = config_base.tokenizer_config()
  c.task = "depth"
  c.model = dict(image_size=64, num_resnet_blocks=1, downsample_ratio=8, num_tokens=32,
                 codebook_dim=32, hidden_dim=8, use_norm=False, channels=1,
                 train_objective="regression", max_value=10.0, residul_type="v1",
                 loss_type="mse_ignore_zero", ema_decay=0.99, commitment_cost=0.25)
  c.tasks.depth = config_base.depth_tokenizer_data(
      16, source=config_base.nyu_source("synthetic"), crop_size=(64, 64),
      eval_batch_size=4)
  c.tasks.depth.update(boundary_crop=(), resize_to=(64, 85), mask_ratio=0.25,
                       mask_patch=8)
  c.codebook_init = "data"
  c.data.worker_count = 1
  c.data.synthetic.update(num_train=320, num_test=16, height=240, width=320)
  c.total_steps = 1000
  c.optimizer.update(name="adam", lr=5e-4)
  c.schedule.update(name="cosine", warmup_steps=20, warmup_ratio=0.1, lr_min=1e-5)
  c.checkpoint.update(every_steps=500, keep=2)
  c.log_every_steps = 50
  c.lock()
  return c
