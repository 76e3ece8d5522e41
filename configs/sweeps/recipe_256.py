"""Issue 27 item 5: the segmentation recipe at 256 px against its 128 px, within the recipe's
training budget (25 minutes on the 2-core CPU): 256 px costs ~4x a step, so 800 steps
instead of 1,200 (the cosine schedule follows num_train_steps).

    python -m cxr_jax.sweep --sweep=configs/sweeps/recipe_256.py --root=runs/recipe_256 \
        --override=data.manual_dir=PATH_TO_THE_ARCHIVE
    python -m cxr_jax.results runs/recipe_256/*/*
"""

from cxr_jax.workflows.sweeps import Sweep


def get_sweep() -> Sweep:
  return Sweep(
    config="configs/unet_kaggle.py",
    variants={"128px": {}, "256px": {"data.image_size": 256, "num_train_steps": 800}},
    seeds=(0,),
    folds=5,
    baseline="128px",
    # aug.opacity: as measured in the README, the recipe before painted opacities joined it
    overrides={"aug.opacity": 0.0},
  )
