"""DICOM radiographs to the stored form: one 8-bit grey image, windowed as its header says."""

import io
import math
import os
from typing import BinaryIO, NamedTuple

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut

from cxr_jax.data import images

DICOM_SUFFIXES = (".dcm", ".dicom")
# Modalities of projection radiographs ('' where the header does not say). CT, MR, US,
# mammography, ... are refused by name: a CT slice predicted as a chest film gave a "lung
# area" of 1270 cm^2.
RADIOGRAPH_MODALITIES = ("CR", "DX", "DR", "RG", "OT", "")
_DEFER_BYTES = 1 << 20  # elements larger than this are not read until needed (never, but pixels)
_HEADER_SLACK_BYTES = 16 << 20


class Dicom(NamedTuple):
  """A decoded radiograph: grey [H, W] uint8, spacing (row_mm, col_mm) or None, and what was
  odd about the file but did not stop it (one line each)."""

  grey: np.ndarray
  spacing: tuple[float, float] | None
  notes: list[str]


def is_dicom(data: bytes) -> bool:
  """A DICOM Part 10 file: 'DICM' after the 128-byte preamble."""
  return data[128:132] == b"DICM"


def decode_dicom(data: bytes | BinaryIO, max_pixels: int | None = None) -> Dicom:
  """Decodes a DICOM radiograph (bytes, or an open seekable binary file).

  The header is read first (large elements skipped): a modality that is not a radiograph,
  more than one frame, more than `max_pixels` pixels, or a file larger than its declared
  image can need, is refused before any pixel is decoded. Grey images go through the
  modality LUT (RescaleSlope/Intercept), then the header's first window
  (WindowCenter/WindowWidth, linear: center +- width/2 maps to 0..255; without one, the
  image's own min..max); MONOCHROME1 (white is low) is inverted. RGB (and YBR) images become
  their luminance, as PIL converts RGB PNGs. NaN/inf pixels are left out of the window and
  shown black (a note counts them). The spacing is PixelSpacing, else ImagerPixelSpacing (at
  the detector): one value is read as square pixels; zero, negative or unreadable ones are
  dropped with a note.

  Raises:
    ValueError (images.TooManyPixels among them): not a usable radiograph, or pixel data
    this installation cannot decode.
  """
  file = io.BytesIO(data) if isinstance(data, bytes) else data
  try:
    header = pydicom.dcmread(file, stop_before_pixels=True, defer_size=_DEFER_BYTES)
    modality = str(header.get("Modality", "") or "").strip().upper()
    rows, cols = int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)
    frames = int(header.get("NumberOfFrames", 1) or 1)
    depth = math.ceil(int(header.get("BitsAllocated", 16) or 16) / 8)
    samples = int(header.get("SamplesPerPixel", 1) or 1)
  except Exception as e:  # pydicom raises many types for bad data
    raise ValueError(f"unreadable DICOM ({type(e).__name__}: {e})") from e
  if modality not in RADIOGRAPH_MODALITIES:
    raise ValueError(
      f"Modality {modality}: not a projection radiograph (predict takes "
      f"{'/'.join(m for m in RADIOGRAPH_MODALITIES if m)} images)"
    )
  images.check_pixels(rows, cols, max_pixels, frames)
  if frames > 1:
    raise ValueError(f"a DICOM of {frames} frames: expected one radiograph")
  size = file.seek(0, os.SEEK_END)
  if size > 2 * rows * cols * depth * samples + _HEADER_SLACK_BYTES:
    raise ValueError(f"{size:,} bytes, far more than its {cols} x {rows} image needs (not read)")
  try:
    file.seek(0)
    ds = pydicom.dcmread(file, defer_size=_DEFER_BYTES)
    pixels = ds.pixel_array
  except Exception as e:  # pydicom raises many types for bad or compressed data
    raise ValueError(f"unreadable DICOM ({type(e).__name__}: {e})") from e
  notes: list[str] = []
  if pixels.ndim == 3 and pixels.shape[-1] == 3:  # RGB (pydicom converts YBR): luminance
    luminance = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    grey = images.deep_to_uint8(luminance) if pixels.dtype != np.uint8 else _round8(luminance)
  elif pixels.ndim == 2:
    grey = _windowed(np.asarray(apply_modality_lut(pixels, ds), np.float64), ds, notes)
  else:
    raise ValueError(f"a DICOM of shape {pixels.shape}: expected one grey or RGB frame")
  spacing = _spacing(ds, notes)
  return Dicom(grey, spacing, notes)


def _round8(values: np.ndarray) -> np.ndarray:
  return np.round(np.clip(values, 0, 255)).astype(np.uint8)


def _windowed(values: np.ndarray, ds: pydicom.Dataset, notes: list[str]) -> np.ndarray:
  """Modality values [H, W] -> grey uint8 through the header's window (see decode_dicom)."""
  finite = np.isfinite(values)
  if not finite.all():
    bad = int(values.size - finite.sum())
    if bad == values.size:
      raise ValueError("every pixel is NaN or infinite: no image")
    notes.append(f"{bad:,} of {values.size:,} pixels are NaN or infinite (shown black)")
  center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
  if center is not None and width is not None and width > 0 and math.isfinite(center + width):
    low, high = center - width / 2, center + width / 2
  else:
    low, high = float(values[finite].min()), float(values[finite].max())
  scale = 255.0 / (high - low) if high > low else 0.0
  grey = _round8(np.where(finite, (values - low) * scale, 0))
  if ds.get("PhotometricInterpretation", "") == "MONOCHROME1":
    grey = np.where(finite, 255 - grey, 0).astype(np.uint8)
  return grey


def _spacing(ds: pydicom.Dataset, notes: list[str]) -> tuple[float, float] | None:
  """PixelSpacing (else ImagerPixelSpacing) in mm, or None; what was odd goes to `notes`."""
  for key in ("PixelSpacing", "ImagerPixelSpacing"):
    value = ds.get(key)
    if value is None or value == "":
      continue
    if isinstance(value, str):  # pydicom keeps a value it cannot parse as text
      texts = value.split("\\")
    else:
      texts = list(value) if isinstance(value, pydicom.multival.MultiValue) else [value]
    try:
      numbers = [float(v) for v in texts]
    except ValueError:
      numbers = []
    if len(numbers) == 1:
      notes.append(f"{key} has one value ({numbers[0]:g}): read as square pixels")
      numbers = numbers * 2
    if len(numbers) != 2 or not all(math.isfinite(x) and x > 0 for x in numbers):
      notes.append(f"{key} {str(value)!r} is not two positive numbers: no lung area")
      return None
    return numbers[0], numbers[1]
  return None


def _first(value) -> float | None:
  """A DICOM number that may be multi-valued (several windows): the first one."""
  if value is None:
    return None
  if isinstance(value, pydicom.multival.MultiValue):
    value = value[0] if len(value) else None
  try:
    return None if value is None or value == "" else float(value)
  except ValueError:
    return None
