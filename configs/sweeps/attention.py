"""Does gating the skips help? U-Net vs Attention U-Net, 5-fold cross-validation.

    python -m cxr_jax.sweep --sweep=configs/sweeps/attention.py --root=runs/attention \
        --override=data.manual_dir=PATH_TO_THE_ARCHIVE
"""

from cxr_jax.workflows.sweeps import Sweep


def get_sweep() -> Sweep:
  return Sweep(
    config="configs/unet.py",
    variants={"unet": {}, "attention_unet": {"model.name": "attention_unet"}},
    seeds=(0,),
    folds=5,
    overrides={"data.name": "kaggle"},
    baseline="unet",
  )
