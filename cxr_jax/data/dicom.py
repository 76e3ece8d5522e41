"""DICOM radiographs to the stored form: one 8-bit grey image, windowed as its header says."""

import io

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut

DICOM_SUFFIXES = (".dcm", ".dicom")


def is_dicom(data: bytes) -> bool:
  """A DICOM Part 10 file: 'DICM' after the 128-byte preamble."""
  return data[128:132] == b"DICM"


def decode_dicom(data: bytes) -> tuple[np.ndarray, tuple[float, float] | None]:
  """(grey [H, W] uint8, pixel spacing (row_mm, col_mm) or None) of a DICOM radiograph.

  The stored values go through the modality LUT (RescaleSlope/Intercept), then the header's
  first window (WindowCenter/WindowWidth, linear: center +- width/2 maps to 0..255; without
  one, the image's own min..max). MONOCHROME1 (white is low) is inverted. The spacing is
  PixelSpacing, else ImagerPixelSpacing (at the detector).

  Raises:
    ValueError: not a single grey frame, or pixel data this installation cannot decode.
  """
  try:
    ds = pydicom.dcmread(io.BytesIO(data))
    pixels = ds.pixel_array
  except Exception as e:  # pydicom raises many types for bad or compressed data
    raise ValueError(f"unreadable DICOM ({type(e).__name__}: {e})") from e
  if pixels.ndim != 2:
    raise ValueError(f"a DICOM of shape {pixels.shape}: expected one grey frame")
  values = np.asarray(apply_modality_lut(pixels, ds), np.float64)
  center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
  if center is not None and width is not None and width > 0:
    low, high = center - width / 2, center + width / 2
  else:
    low, high = float(values.min()), float(values.max())
  scale = 255.0 / (high - low) if high > low else 0.0
  grey = np.round(np.clip((values - low) * scale, 0, 255)).astype(np.uint8)
  if ds.get("PhotometricInterpretation", "") == "MONOCHROME1":
    grey = 255 - grey
  spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
  return grey, (float(spacing[0]), float(spacing[1])) if spacing else None


def _first(value) -> float | None:
  """A DICOM number that may be multi-valued (several windows): the first one."""
  if value is None:
    return None
  if isinstance(value, pydicom.multival.MultiValue):
    value = value[0] if len(value) else None
  return None if value is None else float(value)
