"""A fold ensemble's measurement: the segmentation recipe on the four inner folds of a nested
5-fold split (fold 0 is every run's test split, which no run trains or validates on; fold F
validates run F), then the ensemble of the four scored on fold 0 against each of them.

    python -m cxr_jax.sweep --sweep=configs/sweeps/outer_ensemble.py --root=runs/outer \
        --override=data.manual_dir=PATH_TO_THE_ARCHIVE
    python -m cxr_jax.evaluate --workdir=runs/outer/unet --split=test --checkpoint=best \
        --out=runs/outer/ensemble
"""

from cxr_jax.workflows.sweeps import Sweep


def get_sweep() -> Sweep:
  return Sweep(
    config="configs/unet_kaggle.py",
    variants={"unet": {}},
    seeds=(0,),
    folds=5,
    # aug.opacity: as measured in the README, the recipe before painted opacities joined it
    overrides={"data.outer_fold": 0, "aug.opacity": 0.0},
  )
