"""Augmentation: none, the default affine + intensity, and the default plus elastic."""

from cxr_jax.workflows.sweeps import Sweep


def get_sweep() -> Sweep:
  return Sweep(
    config="configs/unet.py",
    variants={
      "default": {},
      "none": {"aug.enabled": False},
      "elastic": {"aug.elastic_alpha": 8.0, "aug.elastic_sigma": 6.0},
    },
    seeds=(0, 1, 2),
    folds=5,
    overrides={"data.name": "kaggle"},
    baseline="default",
  )
