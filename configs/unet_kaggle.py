"""The real-data lung segmentation recipe: U-Net on the Kaggle archive, trained on a CPU.

    python -m cxr_jax.main --config=configs/unet_kaggle.py --workdir=DIR \
        --config.data.manual_dir=PATH_TO_THE_ARCHIVE
    python -m cxr_jax.main --config=configs/unet_kaggle.py:full ...   # an accelerator

Each choice and its measured effect is in the README (Results on the real X-rays): 128 px,
base 16, 1,200 steps (~10 min on a 2-core CPU), AdamW with cosine decay, an EMA of the
weights for validation and inference, test-time augmentation, and opacities painted into
the lungs (`aug.opacity=0.3`, round three: -0.0005 Dice in domain, +0.024 on consolidated
lung bases). `:full` is the same recipe at 512 px, base 32, 6,000 steps for a GPU or TPU (not
measured here).
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config("smoke" if arg == "smoke" else None)
  if arg not in (None, "", "full", "smoke"):
    raise ValueError(f"Unknown config variant {arg!r}; valid: 'full', 'smoke'.")
  config.model.name = "unet"
  config.aug.opacity = 0.3  # painted opacities in the lungs (README, Round three)
  if arg == "smoke":
    config.optim.ema_decay = 0.9
    config.tta = True
    return config
  config.data.name = "kaggle"
  config.data.image_size = 128
  config.model.base_features = 16
  config.num_train_steps = 1200
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  config.optim.ema_decay = 0.99
  config.tta = True
  if arg == "full":
    config.data.image_size = 512
    config.model.base_features = 32
    config.num_train_steps = 6000
    config.batch_size = 16
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 500
  return config
