"""Start-up checks of a training config: a value that makes no sense fails before anything
runs, naming the key and a value that works."""

import math
import numbers

import ml_collections

from cxr_jax import errors

# (key, rule, a value that works). Rules: 'int >= 1', '> 0', '>= 0', '[0, 1)'.
_RULES = (
  ("num_train_steps", "int >= 1", 1000),
  ("log_every_steps", "int >= 1", 50),
  ("eval_every_steps", "int >= 1", 250),
  ("checkpoint_every_steps", "int >= 1", 250),
  ("max_to_keep", "int >= 1", 2),
  ("num_eval_images", ">= 0", 4),
  ("optim.learning_rate", "> 0", 3e-3),
  ("optim.warmup_steps", ">= 0", 50),
  ("optim.weight_decay", ">= 0", 1e-4),
  ("optim.grad_clip", ">= 0", 1.0),
  ("optim.ema_decay", "[0, 1)", 0.99),
  ("semi.weight", ">= 0", 1.0),
  ("semi.rampup_steps", ">= 0", 200),
  ("loss.dice_weight", ">= 0", 1.0),
  ("loss.class_weight", ">= 0", 1.0),
  ("model.dropout", "[0, 1)", 0.0),
  ("model.base_features", "int >= 1", 8),
  ("model.depth", "int >= 1", 4),
  ("data.synthetic_examples", "int >= 1", 400),
  ("data.num_workers", ">= 0", 0),
  ("data.prefetch", "int >= 1", 2),
  ("data.crop_margin", ">= 0", 0.1),
  ("aug.rotate_deg", ">= 0", 10.0),
  ("aug.scale", "[0, 1)", 0.1),
  ("aug.shift", ">= 0", 0.05),
  ("aug.shear_deg", ">= 0", 5.0),
  ("aug.elastic_alpha", ">= 0", 0.0),
  ("aug.elastic_sigma", "> 0", 8.0),
  ("aug.brightness", ">= 0", 0.1),
  ("aug.contrast", "[0, 1)", 0.1),
  ("aug.gamma", "[0, 1)", 0.1),
  ("aug.noise_std", ">= 0", 0.02),
  ("aug.blur_sigma", ">= 0", 0.0),
)


def _holds(value, rule: str) -> bool:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    return False
  if rule == "int >= 1":
    return isinstance(value, numbers.Integral) and value >= 1
  if rule == "> 0":
    return value > 0
  if rule == ">= 0":
    return value >= 0
  if rule == "[0, 1)":
    return 0 <= value < 1
  raise ValueError(f"unknown rule {rule!r}")


def check_training_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for the first key of `_RULES` whose value breaks its rule."""
  for key, rule, example in _RULES:
    node = config
    for part in key.split("."):
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if node is None:
      continue  # a config without the key (e.g. an older run's) has nothing to check
    if not _holds(node, rule):
      raise errors.ConfigError(
        f"config.{key}={node!r} must be {rule.replace('int ', 'an integer ')}; "
        f"set e.g. --config.{key}={example}."
      )
