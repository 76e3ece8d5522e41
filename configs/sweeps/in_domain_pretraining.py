"""In-domain pretraining, stage 2 (issue 26, item 5): the ResNet-18 classifier from scratch
vs initialised from the same fold's segmentation encoder (stage 1,
configs/sweeps/in_domain_segmentation.py, run first), 5-fold, paired over the same images.

    python -m cxr_jax.sweep --sweep=configs/sweeps/in_domain_segmentation.py \
        --root=runs/in_domain/segmentation --override=data.manual_dir=PATH_TO_THE_ARCHIVE
    python -m cxr_jax.sweep --sweep=configs/sweeps/in_domain_pretraining.py \
        --root=runs/in_domain/classify --override=data.manual_dir=PATH_TO_THE_ARCHIVE

`{fold}` in init_from is the run's config.data.fold (each fold's classifier takes the
encoder trained on that fold's training images only; its test images stay unseen).
"""

from cxr_jax.workflows.sweeps import Sweep

SEGMENTATION_RUNS = "runs/in_domain/segmentation/resnet18/seed0_fold{fold}"


def get_sweep() -> Sweep:
  return Sweep(
    config="configs/classify_kaggle.py",
    variants={
      "scratch": {},
      "in_domain": {"model.init_from": SEGMENTATION_RUNS},
    },
    seeds=(0,),
    folds=5,
    overrides={
      "model.name": "classifier",
      "model.encoder": "resnet18",
      "data.examples": "all_without_masks",
    },
    baseline="scratch",
  )
