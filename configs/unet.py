"""U-Net lung segmentation (Ronneberger et al. 2015).

    python -m cxr_jax.main --config=configs/unet.py --workdir=DIR
    python -m cxr_jax.main --config=configs/unet.py:smoke --workdir=DIR   # seconds

With no other flag this trains on the embedded synthetic phantoms (or the real archive when
$CXR_MANUAL_DIR points at it) in a few minutes on a laptop CPU.
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config(arg)
  config.model.name = "unet"
  return config
