"""Stress tests: test images changed the way diseased lungs change them, the reference masks
kept (numpy and scipy, no JAX).

`consolidation`: one or both lungs' lower 25-50% turned 60-90% of the way to the brightness of
soft tissue (the image's 80th percentile), under an upper edge that rises toward the chest wall
as an effusion's meniscus does: lung that looks like tissue, still lung in the mask, as diseased-lung
datasets outline it. A recipe that learned "lung = dark" then misses the bases, which is what
users saw on COVID-19 / pneumonia films (predicted area a median 0.78 of the reference's).

It is a different shape from training's `aug.opacity` (smooth noise blobs anywhere in the
lungs): a model trained with that augmentation is tested on a change it did not see as such.
Each image's change is drawn from its id, so every model is scored on the same images.
"""

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from cxr_jax import errors
from cxr_jax.data import records

_WHAT = {
  "consolidation": "one or both lungs' lower 25-50% turned 60-90% of the way to soft-tissue "
  "brightness under a meniscus-shaped edge; reference masks unchanged; drawn from each id",
}
KINDS = tuple(_WHAT)
TISSUE_PERCENTILE = 80  # mediastinum and soft tissue: brighter than aerated lung


def consolidate(image: np.ndarray, mask: np.ndarray, seed: int) -> np.ndarray:
  """`image` [H, W] (or [H, W, 1]) with a basal consolidation painted into the lungs of
  `mask` (same shape, nonzero = lung); same dtype, never darker. No lung: unchanged."""
  lungs = np.asarray(mask).reshape(mask.shape[:2]) > 0
  if not lungs.any():
    return image
  rng = np.random.default_rng(seed)
  pixels = np.asarray(image, np.float32).reshape(lungs.shape)
  height, width = lungs.shape
  rows, cols = np.mgrid[:height, :width].astype(np.float32)
  lung_cols = np.flatnonzero(lungs.any(axis=0))
  middle = (lung_cols[0] + lung_cols[-1]) / 2  # between the two lungs
  sides = [rng.integers(2)] if rng.random() < 0.5 else [0, 1]  # one lung, or both
  tissue = np.percentile(pixels, TISSUE_PERCENTILE)
  weight = np.zeros_like(pixels)
  # Drawn reference masks sit a few pixels inside the lung's dark edge: painting the mask's
  # own pixels would leave a dark rim where no disease leaves one (tissue stays as it was).
  radius = max(1, round(0.02 * height))
  grown = ndimage.binary_dilation(lungs, np.ones((2 * radius + 1,) * 2, bool))
  for side in sides:
    lung = grown & ((cols < middle) if side == 0 else (cols >= middle))
    lung_rows = np.flatnonzero(lung.any(axis=1))
    if not lung_rows.size:
      continue
    top, bottom = lung_rows[0], lung_rows[-1]
    extent = max(bottom - top, 1)
    level = bottom - rng.uniform(0.25, 0.5) * extent
    # The meniscus: the edge rises by up to 15% of the lung's height toward the chest wall.
    edge_cols = np.flatnonzero(lung.any(axis=0))
    lateral = (cols - edge_cols[-1]) / (edge_cols[0] - edge_cols[-1] + 1e-6)
    lateral = lateral if side == 0 else 1.0 - lateral
    edge = level - rng.uniform(0.0, 0.15) * extent * np.clip(lateral, 0.0, 1.0)
    soft = 1.0 / (1.0 + np.exp(-(rows - edge) / (0.02 * extent)))  # a feathered upper edge
    weight = np.maximum(weight, soft * lung * rng.uniform(0.6, 0.9))
  painted = pixels + weight * np.maximum(tissue - pixels, 0.0)
  info = np.iinfo(image.dtype) if np.issubdtype(image.dtype, np.integer) else None
  if info is not None:
    painted = np.clip(np.rint(painted), info.min, info.max)
  return painted.reshape(np.shape(image)).astype(image.dtype)


def check_kinds(kinds: Sequence[str]) -> None:
  """ConfigError naming any of `kinds` that is not a stress of KINDS."""
  unknown = [kind for kind in kinds if kind not in KINDS]
  if unknown:
    raise errors.ConfigError(
      f"unknown stress {', '.join(map(repr, unknown))}; known: {', '.join(KINDS)} (data/stress.py)"
    )


def describe(kind: str) -> str:
  """One line of what the `kind` change does (test.json records it)."""
  return _WHAT[kind]


def image_seed(image_id: str, kind: str) -> int:
  """The seed of one image's change: from its id alone, the same in every run and process."""
  return zlib.crc32(f"{kind}:{image_id}".encode())


class StressedSource:
  """A data source whose images with a lung mask carry the `kind` change (masks as they
  were; images without a mask unchanged); picklable, random access like the source."""

  def __init__(self, source: Sequence[Mapping[str, Any]], kind: str):
    check_kinds([kind])
    self._source, self.kind = source, kind
    if hasattr(source, "finding_names"):
      self.finding_names = source.finding_names
    self.dataset_info = getattr(source, "dataset_info", None)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = dict(self._source[index])
    if record.get("has_mask", False):
      seed = image_seed(records.decode_id(record["id"]), self.kind)
      record["image"] = consolidate(record["image"], record["mask"], seed)
    return record
