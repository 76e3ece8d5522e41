"""Image codecs: any PNG/JPEG to the stored form (8-bit grey images, 0/1 masks) and back."""

import io
from typing import BinaryIO

import numpy as np
from PIL import Image
from PIL import ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# The share of pixels a deep (16/32-bit) image may have above (and below) its window: one hot
# pixel or a burnt-in label must not set the grey scale of the whole radiograph.
DEEP_WINDOW_TAIL = 0.0005
_EXIF_ORIENTATION = 0x0112


class TooManyPixels(ValueError):
  """An image whose header declares more pixels than the caller accepts (not decoded)."""


def check_pixels(height: int, width: int, max_pixels: int | None, frames: int = 1) -> None:
  """Raises TooManyPixels when height x width (x frames) exceeds `max_pixels` (None: no cap)."""
  if max_pixels is not None and height * width * frames > max_pixels:
    size = f"{width} x {height}" + (f" x {frames} frames" if frames > 1 else "")
    raise TooManyPixels(
      f"{size} = {height * width * frames:,} pixels, over the cap of {max_pixels:,} "
      "(not decoded; raise --max_pixels to accept it)"
    )


def decode_greyscale(data: bytes | BinaryIO, max_pixels: int | None = None) -> np.ndarray:
  """Decodes PNG/JPEG bytes (or an open binary file) of any mode and bit depth to 8-bit
  greyscale [H, W] uint8, turned upright as its EXIF Orientation says (as viewers show it).

  The header is read first and only: a file that is not an image, or one of more than
  `max_pixels` pixels, is refused before anything is decoded. Palette, RGB(A) and LA images
  go through PIL's luminance conversion. 16-bit and 32-bit images are stretched linearly over
  the image's own range (not `>> 8`: many 16-bit radiographs use only 10-12 bits, which
  `>> 8` would turn nearly black), that range ignoring the DEEP_WINDOW_TAIL darkest and
  brightest pixels (`deep_to_uint8`).

  Raises:
    OSError / ValueError (from PIL): unreadable or truncated data; TooManyPixels.
  """
  with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
    check_pixels(image.height, image.width, max_pixels)
    image.load()  # decodes everything now, so a truncated file fails here
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # a copy only where it turns
      image = ImageOps.exif_transpose(image)
    if image.mode == "L":
      return np.asarray(image, dtype=np.uint8)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
      return deep_to_uint8(np.asarray(image))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
      image = image.convert("RGBA").convert("RGB")
    return np.asarray(image.convert("L"), dtype=np.uint8)


def deep_to_uint8(values: np.ndarray) -> np.ndarray:
  """[H, W] of any numeric type -> uint8, linear over the range that holds all but the
  DEEP_WINDOW_TAIL darkest and brightest pixels (those clip to 0 and 255).

  Why not min..max: a 12-bit radiograph in a 16-bit file with one 65535 pixel (a dead
  detector element, a burnt-in marker) would be squeezed into grey levels 0..16. Why not the
  file's bit depth: PNG has no reliable field for the bits in use. Non-finite values are
  left out of the range and become 0.
  """
  finite = np.isfinite(values) if values.dtype.kind == "f" else None
  sample = values[finite] if finite is not None else values.ravel()
  if sample.size == 0:
    return np.zeros(values.shape, np.uint8)
  if sample.dtype.kind in "ui" and sample.dtype.itemsize <= 2:
    offset = int(sample.min())  # a histogram: no sort, no float copy of a large image
    counts = np.cumsum(np.bincount((sample.astype(np.int64) - offset)))
    total = counts[-1]
    lo = offset + int(np.searchsorted(counts, DEEP_WINDOW_TAIL * total, side="right"))
    hi = offset + int(np.searchsorted(counts, (1 - DEEP_WINDOW_TAIL) * total, side="left"))
  else:
    lo, hi = (float(q) for q in np.quantile(sample, [DEEP_WINDOW_TAIL, 1 - DEEP_WINDOW_TAIL]))
  if hi <= lo:
    lo, hi = float(sample.min()), float(sample.max())
  if hi <= lo:
    return np.zeros(values.shape, np.uint8)
  scaled = (np.asarray(values, np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
  grey = np.round(np.clip(scaled, 0, 255))
  if finite is not None:
    grey[~finite] = 0
  return grey.astype(np.uint8)


def decode_mask(data: bytes) -> np.ndarray:
  """Decodes a mask to [H, W] uint8 in {0, 1}: foreground where the grey level is > 127.

  A mask already stored as 0/1 (maximum 1) keeps its ones.
  """
  grey = decode_greyscale(data)
  threshold = 0 if grey.max() == 1 else 127
  return (grey > threshold).astype(np.uint8)


def encode_png(array: np.ndarray) -> bytes:
  """Encodes [H, W] or [H, W, 1] uint8 as a greyscale PNG."""
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8).reshape(array.shape[:2])).save(
    buffer, format="png", compress_level=3
  )
  return buffer.getvalue()


def is_grey8_png(data: bytes) -> bool:
  """True for an 8-bit greyscale PNG, which can be stored as it is (no re-encoding)."""
  with Image.open(io.BytesIO(data)) as image:
    return image.format == "PNG" and image.mode == "L"
