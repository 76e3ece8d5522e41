"""Lungs, heart and clavicles on JSRT with the SCR outlines (the classic multi-structure
benchmark): one U-Net, a sigmoid channel per structure.

    python -m cxr_jax.data.prepare --dataset=jsrt --manual_dir=PATH --data_dir=DIR
    python -m cxr_jax.main --config=configs/jsrt_structures.py --workdir=RUN \
        --config.data.manual_dir=PATH   # the JSRT .IMG files and the SCR masks below it
    python -m cxr_jax.main --config=configs/jsrt_structures.py:smoke ...   # seconds

Validation reports the lungs' Dice (`dice`) and `heart_dice`, `clavicles_dice`; predict
writes a mask per structure and the cardiothoracic ratio. `:smoke` is the smoke U-Net on
whatever JSRT tree manual_dir holds (the tests write a four-image replica).
"""

from configs import default


def get_config(arg: str | None = None):
  if arg not in (None, "", "smoke"):
    raise ValueError(f"Unknown config variant {arg!r}; valid: 'smoke'.")
  config = default.get_config("smoke" if arg == "smoke" else None)
  config.data.name = "jsrt"
  config.data.examples = "all"  # images without outlines still train nothing wrong
  config.model.name = "unet"
  config.model.structures = True
  if arg == "smoke":
    config.num_train_steps = 4
    config.eval_every_steps = 4
    config.checkpoint_every_steps = 4
    config.batch_size = 2
    config.eval_batch_size = 2
    return config
  config.data.image_size = 256  # clavicles are thin: 128 px loses them
  config.model.base_features = 16
  config.num_train_steps = 3000
  config.eval_every_steps = 250
  config.checkpoint_every_steps = 250
  config.best_metric = "dice"
  return config
