"""Segmentation loss: BCE alone, BCE + soft Dice (the default), soft Dice alone.

Dice alone is approached with a large dice_weight: BCE's share of the gradient is then small
(the loss function has no separate switch for it).
"""

from cxr_jax.workflows.sweeps import Sweep


def get_sweep() -> Sweep:
  return Sweep(
    config="configs/unet.py",
    variants={
      "bce+dice": {},
      "bce": {"loss.dice_weight": 0.0},
      "dice": {"loss.dice_weight": 20.0},
    },
    seeds=(0, 1, 2),
    folds=5,
    overrides={"data.name": "kaggle"},
    baseline="bce+dice",
  )
