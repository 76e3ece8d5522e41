"""Mask clean-up with anatomical priors: two lungs, no holes (numpy/scipy, any size).

Used by evaluate (which reports raw and post-processed numbers) and by predict when
`config.postprocess` is True.
"""

import numpy as np
from scipy import ndimage

# 8-connectivity: two pixels touching at a corner belong to one component.
_EIGHT_CONNECTED = np.ones((3, 3), bool)


def keep_largest_components(mask: np.ndarray, num: int = 2) -> np.ndarray:
  """Keeps the `num` largest 8-connected components of a binary mask [H, W] -> bool [H, W].

  Ties in size are broken by label order (top-left first), so the result is deterministic.
  """
  mask = np.asarray(mask, bool)
  labels, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
  if count <= num:
    return mask.copy()
  sizes = np.bincount(labels.ravel())[1:]
  keep = np.argsort(-sizes, kind="stable")[:num] + 1
  return np.isin(labels, keep)


def fill_holes(mask: np.ndarray) -> np.ndarray:
  """Fills background regions not connected to the image border -> bool [H, W]."""
  return ndimage.binary_fill_holes(np.asarray(mask, bool))


def clean_mask(mask: np.ndarray, num_components: int = 2) -> np.ndarray:
  """The post-processing: keep the `num_components` largest components, then fill holes."""
  return fill_holes(keep_largest_components(mask, num_components))
