"""In-domain pretraining, stage 1: the 5-fold lung-segmentation U-Nets on a ResNet-18 encoder
whose encoders the classifiers of configs/sweeps/in_domain_pretraining.py start from.

    python -m cxr_jax.sweep --sweep=configs/sweeps/in_domain_segmentation.py \
        --root=runs/in_domain/segmentation --override=data.manual_dir=PATH_TO_THE_ARCHIVE
"""

from cxr_jax.workflows.sweeps import Sweep


def get_sweep() -> Sweep:
  return Sweep(
    config="configs/unet_kaggle.py",
    variants={"resnet18": {"model.encoder": "resnet18"}},
    seeds=(0,),
    folds=5,
    # aug.opacity: as measured in the README, the recipe before painted opacities joined it
    overrides={"aug.opacity": 0.0},
  )
