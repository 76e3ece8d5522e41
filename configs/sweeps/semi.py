"""The segmentation recipe (configs/unet_kaggle.py) with and without a mean teacher on the
images that have no mask, 5-fold cross-validation, paired over the same test images.

    python -m cxr_jax.sweep --sweep=configs/sweeps/semi.py --root=runs/semi \
        --override=data.manual_dir=PATH_TO_THE_ARCHIVE

The supervised variant's five runs are the recipe's cross-validation (README, Results).
"""

from cxr_jax.workflows.sweeps import Sweep


def get_sweep() -> Sweep:
  return Sweep(
    config="configs/unet_kaggle.py",
    variants={
      "supervised": {},
      "mean_teacher": {"data.examples": "all", "semi.weight": 1.0},
    },
    seeds=(0,),
    folds=5,
    baseline="supervised",
    # aug.opacity: as measured in the README, the recipe before painted opacities joined it
    overrides={"aug.opacity": 0.0},
  )
