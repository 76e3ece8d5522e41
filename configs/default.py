"""Default hyperparameters: every experiment config starts from this one.

Every key, its default, valid values and meaning are in the package's schema
(`cxr_jax/config/keys.py`); this file adds the variants. Experiment configs import it and
change a few fields. `get_config(arg)` takes the string after the
colon in `--config=configs/unet.py:smoke`.
"""

import ml_collections

from cxr_jax.config import schema


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the default config (a U-Net on the embedded synthetic data)."""
  config = schema.defaults()
  if arg == "smoke":
    apply_smoke(config)
  elif arg:
    raise ValueError(f"Unknown config variant {arg!r}; valid: 'smoke'.")
  return config


def apply_smoke(config: ml_collections.ConfigDict) -> None:
  """Shrinks a config to a run of seconds (tests, first try on a new machine)."""
  config.data.name = "synthetic"
  config.data.image_size = 32
  config.data.synthetic_examples = 48
  config.model.base_features = 4
  config.model.depth = 2
  config.batch_size = 4
  config.eval_batch_size = 8
  config.num_train_steps = 6
  config.log_every_steps = 2
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 3
  config.optim.warmup_steps = 1
  config.num_eval_images = 2
