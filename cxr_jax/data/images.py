"""Image codecs: any PNG/JPEG to the stored form (8-bit grey images, 0/1 masks) and back."""

import io

import numpy as np
from PIL import Image

from cxr_jax.data.records import STRUCTURES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
STRUCTURE_BITS = {name: k for k, name in enumerate(STRUCTURES)}


def decode_greyscale(data: bytes) -> np.ndarray:
  """Decodes PNG/JPEG bytes of any mode and bit depth to 8-bit greyscale [H, W] uint8.

  Palette, RGB(A) and LA images go through PIL's luminance conversion. 16-bit and 32-bit
  images are stretched linearly from the image's own min..max to 0..255 (not `>> 8`: many
  16-bit radiographs use only 10-12 bits, which `>> 8` would turn nearly black).

  Raises:
    OSError / ValueError (from PIL): unreadable or truncated data.
  """
  with Image.open(io.BytesIO(data)) as image:
    image.load()  # decodes everything now, so a truncated file fails here
    if image.mode == "L":
      return np.asarray(image, dtype=np.uint8)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
      values = np.asarray(image).astype(np.float64)
      lo, hi = float(values.min()), float(values.max())
      if hi <= lo:
        return np.zeros(values.shape, np.uint8)
      return np.round((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
      image = image.convert("RGBA").convert("RGB")
    return np.asarray(image.convert("L"), dtype=np.uint8)


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


def decode_structures(data: bytes, names: tuple[str, ...]) -> np.ndarray:
  """The `structures` feature's PNG bit plane as [H, W, len(names)] uint8 0/1 masks, one per
  name of `records.STRUCTURES` asked for (bit k of the plane is STRUCTURES[k])."""
  with Image.open(io.BytesIO(data)) as image:
    bits = np.asarray(image, dtype=np.uint8)
  bits = bits.reshape(bits.shape[:2])
  return np.stack([(bits >> STRUCTURE_BITS[n]) & 1 for n in names], axis=-1).astype(np.uint8)
