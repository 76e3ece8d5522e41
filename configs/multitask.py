"""U-Net encoder shared by a segmentation decoder and a normal/abnormal head."""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config(arg)
  config.model.name = "multitask"
  config.data.examples = "all"  # unmasked images train the classifier head only
  config.loss.class_weight = 0.5
  config.best_metric = "auc"
  return config
