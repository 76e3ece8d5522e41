"""The 'kaggle' dataset kind: the Montgomery + Shenzhen archive read into `Example`s."""

import logging

import numpy as np

from cxr_jax.data import images
from cxr_jax.data import kaggle_archive
from cxr_jax.data.records import Example
from cxr_jax.data.records import Skip

# Montgomery County CXRs are 4020 x 4892 or 4892 x 4020 pixels at 0.0875 mm (Jaeger et al.,
# 2014). Shenzhen's spacing is not published.
MONTGOMERY_SPACING_MM = 0.0875
MONTGOMERY_SHAPES = ((4892, 4020), (4020, 4892))
# A resized Montgomery image (e.g. the 512 x 512 archive) keeps its field of view: its spacing
# is the native one scaled by the resize. Most are portrait, 4892 rows x 4020 columns.
MONTGOMERY_ASSUMED_SHAPE = (4892, 4020)


def pixel_spacing(source: str, height: int, width: int) -> tuple[tuple[float, float], bool]:
  """((row_mm, col_mm), estimated) of an image; (0, 0) when unknown (Shenzhen).

  Montgomery at its acquisition size: 0.0875 mm exactly. Montgomery resized: 0.0875 mm scaled
  by the resize from 4892 x 4020 (the common portrait orientation), flagged estimated, since
  a square copy no longer says which orientation it was.
  """
  if source != "montgomery":
    return (0.0, 0.0), False
  if (height, width) in MONTGOMERY_SHAPES:
    return (MONTGOMERY_SPACING_MM, MONTGOMERY_SPACING_MM), False
  native_h, native_w = MONTGOMERY_ASSUMED_SHAPE
  if width > height:
    native_h, native_w = native_w, native_h
  spacing = (MONTGOMERY_SPACING_MM * native_h / height, MONTGOMERY_SPACING_MM * native_w / width)
  return spacing, True


def find(manual_dir: str) -> str:
  """Where the archive is in `manual_dir`; raises `ArchiveError` saying where it looked."""
  return kaggle_archive.find_archive(manual_dir).describe()


class KaggleReader:
  """Lists the archive's images (with masks and readings) and reads them one by one."""

  def __init__(self, manual_dir: str, num_examples: int = 0):
    del num_examples  # the archive decides
    self._archive = kaggle_archive.find_archive(manual_dir)
    logging.info("Reading the archive at %s", self._archive.describe())
    for ignored in self._archive.ignored_roots:
      logging.info(
        "Ignoring %s: a copy of the tree read from %s.",
        self._archive.tree.describe(ignored),
        self._archive.describe(),
      )
    self._records, self.skipped = kaggle_archive.scan_archive(self._archive)

  def describe(self) -> str:
    return self._archive.describe()

  def where(self, file: str) -> str:
    return self._archive.tree.describe(file)

  def items(self) -> list[tuple[str, kaggle_archive.Record]]:
    return [(record.id, record) for record in self._records]

  def read(self, record: kaggle_archive.Record, skip) -> Example | None:
    """The record's example, or None after `skip(Skip)` when its image cannot be used."""
    try:
      data = self._archive.read(record.image)
      grey = images.decode_greyscale(data)
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ...
      skip(Skip(record.image, "unreadable image", str(e)))
      if record.mask:
        skip(Skip(record.mask, "its image was skipped"))
      return None
    sex, age, finding = "", -1, ""
    if record.readings:
      text = kaggle_archive.decode_text(self._archive.read(record.readings))
      sex, age, finding = kaggle_archive.parse_readings(text)
    spacing, estimated = pixel_spacing(record.source, *grey.shape)
    return Example(
      id=record.id,
      image=grey,
      mask=self._read_mask(record, grey.shape, skip),
      label=record.label,
      source=record.source,
      spacing_mm=spacing,
      spacing_estimated=estimated,
      sex=sex,
      age=age,
      finding=finding,
      image_png=data if images.is_grey8_png(data) else None,
    )

  def _read_mask(self, record, shape, skip) -> np.ndarray | None:
    """The 0/1 mask of a record, or None (no mask, or a mask that cannot be used)."""
    if not record.mask:
      return None
    kept = f"{record.id} kept without a mask"
    try:
      mask = images.decode_mask(self._archive.read(record.mask))
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ...
      skip(Skip(record.mask, "unreadable mask", f"{e}; {kept}"))
      return None
    if mask.shape != shape:
      skip(
        Skip(
          record.mask,
          "mask size differs",
          (
            f"mask is {mask.shape[0]}x{mask.shape[1]} but its image is {shape[0]}x{shape[1]}; "
            f"{kept}"
          ),
        )
      )
      return None
    if not mask.any():
      skip(Skip(record.mask, "empty mask", f"nothing > 127; {kept}"))
      return None
    return mask
