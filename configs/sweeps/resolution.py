"""Resolution: the model's input at 128 vs 256 px (the same width and steps)."""

from cxr_jax.workflows.sweeps import Sweep
from cxr_jax.workflows.sweeps import zipped


def get_sweep() -> Sweep:
  return Sweep(
    config="configs/unet.py",
    variants=zipped(["128px", "256px"], **{"data.image_size": [128, 256]}),
    seeds=(0, 1, 2),
    folds=5,
    overrides={"data.name": "kaggle"},
    baseline="128px",
  )
