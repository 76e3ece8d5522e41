"""Prediction pictures: a radiograph with the predicted and true lung masks drawn on it.

Red: the prediction (tinted region and solid outline). Green: the true mask's outline, drawn
last so it stays visible where the two agree. Used by the trainer's TensorBoard images and by
`predict.py` / the reports, at the model's resolution or at an image's native size.
"""

import numpy as np
from scipy import ndimage

PRED_RGB = (255, 40, 40)
TRUE_RGB = (40, 255, 40)


def _grey_uint8(image: np.ndarray) -> np.ndarray:
  """uint8 stays as is; any float (e.g. normalised, negative) is stretched min..max to 0..255."""
  if image.dtype == np.uint8:
    return image
  image = np.asarray(image, np.float32)
  lo, hi = float(image.min()), float(image.max())
  if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
    return np.zeros(image.shape, np.uint8)
  return np.round((image - lo) / (hi - lo) * 255).astype(np.uint8)


def _outline(mask: np.ndarray, thickness: int) -> np.ndarray:
  """Pixels of `mask` within `thickness` 4-neighbour steps of its outside (edges count)."""
  inner = ndimage.binary_erosion(mask, iterations=thickness, border_value=0)
  return mask & ~inner


def _as_mask(name: str, mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  mask = np.asarray(mask)
  if mask.ndim == 3 and mask.shape[-1] == 1:
    mask = mask[..., 0]
  if mask.shape != shape:
    raise ValueError(f"overlay: {name} has shape {mask.shape}, the image {shape}; they must match.")
  return mask > 0.5 if mask.dtype != bool else mask


def overlay(
  image: np.ndarray,
  mask_pred: np.ndarray,
  mask_true: np.ndarray | None = None,
  *,
  alpha: float = 0.35,
  thickness: int | None = None,
) -> np.ndarray:
  """Draws masks on a grey image.

  Args:
    image: [H, W] (or [H, W, 1]) uint8, or float of any range (stretched min..max).
    mask_pred: [H, W] (or [H, W, 1]) bool, or numeric where > 0.5 is lung (0/1, 0/255).
    mask_true: same as mask_pred, or None when the image has no true mask.
    alpha: opacity of the red tint over the predicted region.
    thickness: outline width in pixels; None: about 1/256 of the shorter side (at least 1),
      so outlines stay visible on large native-size images.

  Returns:
    [H, W, 3] uint8 RGB.
  """
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim != 2:
    raise ValueError(f"overlay: image has shape {image.shape}; expected [H, W] or [H, W, 1].")
  shape = image.shape
  if thickness is None:
    thickness = max(1, round(min(shape) / 256))
  grey = _grey_uint8(image)
  pred = _as_mask("mask_pred", mask_pred, shape)
  # Integer blending, channel by channel: native-size images have tens of megapixels.
  weight = int(round(alpha * 256))
  grey16 = grey.astype(np.uint16) * (256 - weight)
  rgb = np.empty(shape + (3,), np.uint8)
  for channel, colour in enumerate(PRED_RGB):
    tinted = ((grey16 + weight * colour + 128) >> 8).astype(np.uint8)
    rgb[..., channel] = np.where(pred, tinted, grey)
  rgb[_outline(pred, thickness)] = PRED_RGB
  if mask_true is not None:
    rgb[_outline(_as_mask("mask_true", mask_true, shape), thickness)] = TRUE_RGB
  return rgb
