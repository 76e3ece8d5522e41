"""The cross-site matrix: train on one hospital's X-rays, test on the other's.

    python -m cxr_jax.sweep --sweep=configs/sweeps/cross_site.py --root=runs/cross_site \
        --override=data.manual_dir=PATH_TO_THE_ARCHIVE

Each run's test split is the other source entirely (config.data.split='cross_site').
Published anchor: U-Net at 256 px trained on Montgomery, tested on Shenzhen, Dice 0.963.
"""

from cxr_jax.workflows.sweeps import Sweep


def get_sweep() -> Sweep:
  return Sweep(
    config="configs/unet.py",
    variants={
      "montgomery_to_shenzhen": {"data.train_sources": "montgomery"},
      "shenzhen_to_montgomery": {"data.train_sources": "shenzhen"},
    },
    seeds=(0,),
    overrides={"data.name": "kaggle", "data.split": "cross_site"},
  )
