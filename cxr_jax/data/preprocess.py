"""Host-side image preparation: letterbox to a square, map back, normalise intensities.

numpy and PIL only (no jax): this runs in grain worker processes and in `predict`, and both
must prepare an image the same way, so they share `prepare_image`.

Letterbox geometry: the long side is scaled to `size`, the short side to
`round(short * size / long)`, and the rest is padded, centred (`pad_top = (size - h') // 2`).
The resized content shape is a function of (height, width, size) alone, so the map back
(`unletterbox`) needs only the native shape and the pad, never a float scale round trip.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

# PIL reduces big images by whole factors (box filter) before the final resample when the
# downscale is larger than this: ~10x faster on an 8000x8000 input, still antialiased.
_REDUCING_GAP = 3.0
# Normalisation: intensities outside these percentiles of the image's content are clipped.
_CLIP_PERCENTILES = (1.0, 99.0)
_MIN_STD = 1e-3
_ORDERS = ("bilinear", "nearest")


@dataclasses.dataclass(frozen=True)
class Letterbox:
  """Where a native image sits inside its letterboxed square.

  scale: output pixels per native pixel (`size / max(height, width)`).
  pad_top, pad_left: rows/columns of padding before the content.
  height, width: the native image's shape.
  """

  scale: float
  pad_top: int
  pad_left: int
  height: int
  width: int

  def content_shape(self, size: int) -> tuple[int, int]:
    """(rows, cols) of the resized image inside a `size` x `size` square."""
    return content_shape(self.height, self.width, size)


def content_shape(height: int, width: int, size: int) -> tuple[int, int]:
  """Shape of a `height` x `width` image after scaling its long side to `size`."""
  long_side = max(height, width)
  return (
    max(1, min(size, round(height * size / long_side))),
    max(1, min(size, round(width * size / long_side))),
  )


def _as_2d(image: np.ndarray, what: str) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim != 2:
    raise ValueError(
      f"{what} must be [H, W] or [H, W, 1] (one grey channel), got shape "
      f"{image.shape}; convert colour images to grey first."
    )
  if image.shape[0] < 1 or image.shape[1] < 1:
    raise ValueError(f"{what} is empty (shape {image.shape}).")
  return image


def _check_order(order: str) -> None:
  if order not in _ORDERS:
    raise ValueError(f"order={order!r}; valid: {_ORDERS}.")


def _resize(image: np.ndarray, shape: tuple[int, int], order: str) -> np.ndarray:
  """Resizes a 2-D array to `shape` (rows, cols); antialiased when shrinking.

  uint8 (and bool) go through PIL's 8-bit mode; every other dtype through its float32 mode,
  so 16-bit radiographs and float predictions keep their precision. Nearest returns the
  input dtype; bilinear returns uint8 for uint8 input and float32 otherwise.
  """
  if image.shape == tuple(shape):
    return image if order == "nearest" or image.dtype == np.uint8 else image.astype(np.float32)
  if image.dtype == np.bool_:
    image = image.astype(np.uint8)
  if image.dtype == np.uint8:
    pil = Image.fromarray(image, mode="L")
  elif np.issubdtype(image.dtype, np.number):
    pil = Image.fromarray(image.astype(np.float32), mode="F")
  else:
    raise TypeError(f"cannot resize an image of dtype {image.dtype}; pass a numeric array.")
  if order == "nearest":
    out = pil.resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(out).astype(image.dtype, copy=False)
  # Pillow's bilinear filter widens its support when downscaling (antialiasing).
  out = pil.resize((shape[1], shape[0]), Image.Resampling.BILINEAR, reducing_gap=_REDUCING_GAP)
  return np.asarray(out)


def letterbox(
  image: np.ndarray, size: int, *, order: str = "bilinear", pad_value: float = 0
) -> tuple[np.ndarray, Letterbox]:
  """Scales the long side of `image` to `size` and pads the short side, centred.

  Args:
    image: [H, W] or [H, W, 1], any numeric dtype (uint8, uint16, float, bool).
    size: side of the output square.
    order: 'bilinear' (images, antialiased when shrinking) or 'nearest' (masks, labels).
    pad_value: value of the padding.

  Returns:
    ([size, size] array, Letterbox). dtype: the input's for 'nearest' and for uint8
    'bilinear', float32 for other 'bilinear' inputs.
  """
  _check_order(order)
  image = _as_2d(image, "image")
  if not isinstance(size, (int, np.integer)) or size < 1:
    raise ValueError(f"size={size!r} must be a positive int.")
  height, width = image.shape
  rows, cols = content_shape(height, width, size)
  content = _resize(image, (rows, cols), order)
  pad_top, pad_left = (size - rows) // 2, (size - cols) // 2
  out = np.full((size, size), pad_value, dtype=content.dtype)
  out[pad_top : pad_top + rows, pad_left : pad_left + cols] = content
  box = Letterbox(
    scale=size / max(height, width), pad_top=pad_top, pad_left=pad_left, height=height, width=width
  )
  return out, box


def unletterbox(pred: np.ndarray, box: Letterbox, *, order: str = "bilinear") -> np.ndarray:
  """Inverse of `letterbox`: crops the padding and resizes to the native (height, width).

  Args:
    pred: [S, S] or [S, S, C] (e.g. probabilities, logits or a 0/1 mask).
    box: the `Letterbox` returned for the native image.
    order: 'bilinear' (probabilities; threshold afterwards) or 'nearest' (hard masks).

  Returns:
    [height, width] or [height, width, C]; float32 for 'bilinear', pred's dtype for 'nearest'.
  """
  _check_order(order)
  pred = np.asarray(pred)
  if pred.ndim not in (2, 3) or pred.shape[0] != pred.shape[1]:
    raise ValueError(f"pred must be [S, S] or [S, S, C], got shape {pred.shape}.")
  size = pred.shape[0]
  rows, cols = box.content_shape(size)
  if box.pad_top != (size - rows) // 2 or box.pad_left != (size - cols) // 2:
    raise ValueError(
      f"{box} does not match a {size}x{size} prediction (expected pad "
      f"({(size - rows) // 2}, {(size - cols) // 2})); pass the box of this image."
    )
  crop = pred[box.pad_top : box.pad_top + rows, box.pad_left : box.pad_left + cols]
  native = (box.height, box.width)
  if crop.ndim == 2:
    return _resize(crop, native, order)
  return np.stack([_resize(crop[..., c], native, order) for c in range(crop.shape[-1])], -1)


def normalise(image: np.ndarray) -> np.ndarray:
  """Per-image intensity normalisation for radiographs -> float32, ~zero mean, unit std.

  Why this form: radiographs carry burnt-in text and markers (small, saturated), and black
  borders or collimation (large, constant). A plain mean/std is dragged by both. Here the
  statistics come from the image's *content*, the pixels strictly between its minimum and
  maximum values (which drops constant borders, letterbox padding and saturated text); the
  image is clipped to the 1st-99th percentiles of that content (so a few extreme pixels
  cannot set the scale) and then standardised with the content's mean and std. When
  almost nothing is content (a blank or binary image) the whole image is used. A constant
  image (all black) has std 0 and maps to all zeros, never NaN.

  Args:
    image: [H, W] or [H, W, 1], any numeric dtype.

  Returns:
    float32 array with the input's shape.
  """
  array = np.asarray(image)
  if not np.issubdtype(array.dtype, np.number) and array.dtype != np.bool_:
    raise TypeError(f"normalise needs a numeric image, got dtype {array.dtype}.")
  x = array.astype(np.float32)
  if x.size == 0:
    raise ValueError(f"normalise got an empty image (shape {x.shape}).")
  if not np.all(np.isfinite(x)):
    raise ValueError("normalise got NaN or inf pixels; fix the image or its decoder.")
  lo_value, hi_value = x.min(), x.max()
  content = x[(x > lo_value) & (x < hi_value)]
  if content.size < max(16, x.size // 100):
    content = x.ravel()
  lo, hi = np.percentile(content, _CLIP_PERCENTILES)
  content = np.clip(content, lo, hi)
  mean, std = content.mean(), content.std()
  return ((np.clip(x, lo, hi) - mean) / max(float(std), _MIN_STD)).astype(np.float32)


def prepare_image(image: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
  """The model's view of a native radiograph: letterboxed, normalised -> ([S, S] float32, box).

  Letterboxes first (cheap on a big image), normalises the content only, and sets the
  padding to the normalised content's minimum (black, like a radiograph's own border).
  """
  boxed, box = letterbox(image, size, order="bilinear")
  rows, cols = box.content_shape(size)
  content = boxed[box.pad_top : box.pad_top + rows, box.pad_left : box.pad_left + cols]
  content = normalise(content)
  out = np.full((size, size), content.min(), dtype=np.float32)
  out[box.pad_top : box.pad_top + rows, box.pad_left : box.pad_left + cols] = content
  return out, box


def prepare_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """Letterboxes a 0/1 mask -> [S, S] float32 in {0, 1}.

  Area-weighted (antialiased bilinear) resize, then >= 0.5: each output pixel is 1 when
  most of the native area it covers is lung, which follows the boundary more closely than
  picking one native pixel (nearest) and stays exactly binary.
  """
  mask = _as_2d(mask, "mask")
  boxed, _ = letterbox((mask > 0).astype(np.float32), size, order="bilinear")
  return (boxed >= 0.5).astype(np.float32)
