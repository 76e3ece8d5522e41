"""The normal/abnormal recipe (configs/classify_kaggle.py), 5-fold cross-validation.

    python -m cxr_jax.sweep --sweep=configs/sweeps/classify.py --root=runs/classify \
        --override=data.manual_dir=PATH_TO_THE_ARCHIVE
"""

from cxr_jax.workflows.sweeps import Sweep


def get_sweep() -> Sweep:
  return Sweep(config="configs/classify_kaggle.py", variants={"multitask": {}}, folds=5)
