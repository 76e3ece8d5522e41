"""Segment, crop to the lungs, classify: a classifier trained on predicted lung crops.

    python -m cxr_jax.main --config=configs/unet.py --workdir=SEG
    python -m cxr_jax.main --config=configs/lung_crop_classifier.py --workdir=CLS \
        --config.data.crop_workdir=SEG

The segmentation run's best checkpoint predicts each image's lungs once (cached in CLS);
images are cropped to the lung box plus `crop_margin` before the usual letterbox.
"""

from configs import classifier


def get_config(arg: str | None = None):
  config = classifier.get_config(arg)
  config.data.crop_to_lungs = True
  config.data.crop_workdir = ""  # required: a segmentation run's workdir
  config.data.crop_margin = 0.05
  return config
