"""Issue 27 item 4: a U-Net on a ResNet-34 encoder (from scratch) against the segmentation
recipe's own U-Net encoder, the same recipe otherwise (steps, batch, optimiser, EMA, TTA).

    python -m cxr_jax.sweep --sweep=configs/sweeps/encoders.py --root=runs/encoders \
        --override=data.manual_dir=PATH_TO_THE_ARCHIVE
    python -m cxr_jax.results runs/encoders/*/*        # paired Dice, per source

An ImageNet-initialised encoder is the same run with `--override=model.init_from=FILE`
(README, Transfer learning).
"""

from cxr_jax.workflows.sweeps import Sweep


def get_sweep() -> Sweep:
  return Sweep(
    config="configs/unet_kaggle.py",
    variants={"recipe": {}, "resnet34": {"model.encoder": "resnet34"}},
    seeds=(0,),
    folds=5,
    baseline="recipe",
    stress=("consolidation",),  # each run also scored on consolidated bases (README)
  )
