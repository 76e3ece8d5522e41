"""The real-data normal/abnormal recipe: a multi-task U-Net (lung masks and a class head on
the shared encoder) trained from scratch on the Kaggle archive, on a CPU.

    python -m cxr_jax.main --config=configs/classify_kaggle.py --workdir=DIR \
        --config.data.manual_dir=PATH_TO_THE_ARCHIVE
    python -m cxr_jax.evaluate --workdir=DIR --checkpoint=best   # fits the temperature
    python -m cxr_jax.predict --workdir=DIR --input=X --output=OUT   # masks and p_abnormal

128 px, base 16, every image (the unmasked ones train the class head), classes balanced,
an EMA of the weights, 1,000 steps (~8 min on a 2-core CPU); the checkpoint kept is the best
validation AUC. evaluate fits a temperature on the validation split (DIR/calibration.json),
which predict then applies (p_abnormal_calibrated). Measured in the README (Results).
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config("smoke" if arg == "smoke" else None)
  if arg not in (None, "", "smoke"):
    raise ValueError(f"Unknown config variant {arg!r}; valid: 'smoke'.")
  config.model.name = "multitask"
  config.data.examples = "all"
  config.data.balance_classes = True
  config.loss.class_weight = 0.5
  config.best_metric = "auc"
  config.optim.ema_decay = 0.9 if arg == "smoke" else 0.99
  if arg == "smoke":
    return config
  config.data.name = "kaggle"
  config.model.base_features = 16
  config.num_train_steps = 1000
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100
  return config
