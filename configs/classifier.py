"""Normal/abnormal (tuberculosis) classification of whole images with a compact ResNet."""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config(arg)
  config.model.name = "classifier"
  config.model.base_features = 16
  config.data.examples = "all_without_masks"
  config.data.balance_classes = True
  config.best_metric = "auc"
  config.optim.learning_rate = 1e-3
  return config
