"""Lung boxes and a data source cropped to them (numpy only: grain workers unpickle it)."""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cxr_jax.data import records

Box = tuple[int, int, int, int]  # top, left, bottom, right (exclusive), native pixels


def mask_box(mask: np.ndarray) -> Box | None:
  """Bounding box of a binary [H, W] mask; None when it is empty."""
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  if not rows.size:
    return None
  return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def grow_box(box: Box, margin: float, height: int, width: int) -> Box:
  """`box` grown by `margin` of its own height/width on each side, clipped to the image."""
  top, left, bottom, right = box
  dy, dx = round(margin * (bottom - top)), round(margin * (right - left))
  return max(0, top - dy), max(0, left - dx), min(height, bottom + dy), min(width, right + dx)


class CroppedSource:
  """A data source whose images (and masks) are cropped to given boxes; picklable."""

  def __init__(
    self, source: Sequence[Mapping[str, Any]], boxes: Mapping[str, Box | None], margin: float
  ):
    self._source, self._boxes, self._margin = source, dict(boxes), margin

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = dict(self._source[index])
    box = self._boxes.get(records.decode_id(record["id"]))
    if box is not None:
      height, width = record["image"].shape[:2]
      top, left, bottom, right = grow_box(box, self._margin, height, width)
      record["image"] = record["image"][top:bottom, left:right]
      record["mask"] = record["mask"][top:bottom, left:right]
    return record
