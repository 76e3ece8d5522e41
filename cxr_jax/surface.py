"""Per-image mask metrics at native resolution (numpy/scipy), and their aggregates.

These are the numbers papers report: computed on one image's full-size binary masks, after the
prediction has been mapped back from the model's letterboxed square (`evaluate.py`). The jit
metrics in `metrics.py` are their cheap training-time counterparts at the model's resolution.

Defined behaviour (tested in tests/test_surface.py):
- Dice, IoU, precision, recall: `metrics.binary_scores` (one implementation and one
  convention for the codebase): both masks empty -> 1.0 (nothing to find, nothing found).
  Any other 0/0 (e.g. precision when nothing is predicted but the truth is not empty) -> 0.0.
- HD95 and ASSD: both empty -> 0.0. Exactly one empty -> the image diagonal
  `hypot(H - 1, W - 1)` (in mm: scaled by the spacing), the largest distance two pixels of the
  image can have. A finite worst case keeps a failed image in the mean instead of dropping it
  silently, as NaN would.
- Boundary of a mask: its pixels with a 4-neighbour outside the mask (scipy's default cross
  erosion; the image edge counts as outside). A one-pixel mask is its own boundary.
- HD95: the 95th percentile of the distances from each boundary pixel of one mask to the
  nearest boundary pixel of the other, both directions pooled (as medpy's `hd95`).
- ASSD (`asd`): the mean of the two directed mean boundary distances (as medpy's `assd`).
"""

from collections.abc import Mapping, Sequence
import dataclasses
import math

import numpy as np
from scipy import ndimage

from cxr_jax import metrics
from cxr_jax.data import kaggle_archive

# Montgomery County CXRs are 4020 x 4892 or 4892 x 4020 pixels at 0.0875 mm (Jaeger et al.,
# 2014). Shenzhen's spacing is not published; synthetic phantoms have none.
MONTGOMERY_SPACING_MM = 0.0875
MONTGOMERY_SHAPES = ((4892, 4020), (4020, 4892))
# A resized Montgomery image (e.g. the 512 x 512 archive) keeps its field of view: its spacing
# is the native one scaled by the resize. Most are portrait, 4892 rows x 4020 columns.
MONTGOMERY_ASSUMED_SHAPE = (4892, 4020)

SOURCES = kaggle_archive.SOURCES  # the dataset's ClassLabel order
MASK_METRICS = ("dice", "iou", "precision", "recall", "hd95_px", "asd_px", "hd95_mm", "asd_mm")
# Lower is better for these; the worst images are those with the highest values.
LOWER_IS_BETTER = frozenset({"hd95_px", "asd_px", "hd95_mm", "asd_mm"})


@dataclasses.dataclass(frozen=True)
class Spacing:
  """Pixel spacing in mm (rows, columns), and whether it was measured or inferred."""
  row_mm: float
  col_mm: float
  estimated: bool


def pixel_spacing(source: str, height: int, width: int) -> Spacing | None:
  """The pixel spacing of an image from `source` at `height` x `width`; None when unknown.

  Montgomery at its acquisition size: 0.0875 mm exactly. Montgomery resized (same field of
  view): 0.0875 mm scaled by the resize from 4892 x 4020 (the common portrait orientation),
  flagged `estimated`, since a square archive no longer says which orientation it was.
  """
  if source != "montgomery":
    return None
  if (height, width) in MONTGOMERY_SHAPES:
    return Spacing(MONTGOMERY_SPACING_MM, MONTGOMERY_SPACING_MM, estimated=False)
  native_h, native_w = MONTGOMERY_ASSUMED_SHAPE
  if width > height:
    native_h, native_w = native_w, native_h
  return Spacing(MONTGOMERY_SPACING_MM * native_h / height,
                 MONTGOMERY_SPACING_MM * native_w / width, estimated=True)


def overlap_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
  """Dice, IoU, precision and recall of two binary masks [H, W] (any dtype; nonzero = lung)."""
  pred, truth = _as_bool_pair(pred, truth)
  scores = metrics.binary_scores(pred[None], truth[None])
  return {name: float(value[0]) for name, value in scores.items()}


def boundary(mask: np.ndarray) -> np.ndarray:
  """Boundary pixels of a binary mask [H, W] -> bool [H, W] (see the module docstring)."""
  mask = np.asarray(mask, bool)
  return mask & ~ndimage.binary_erosion(mask)


def surface_distances(pred: np.ndarray, truth: np.ndarray,
                      spacing: tuple[float, float] = (1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
  """Directed boundary distances (pred -> truth, truth -> pred), in units of `spacing`.

  Both masks must be non-empty. Only the bounding box of the two masks is transformed, which
  is exact (every boundary pixel lies inside it) and keeps full-size images fast.
  """
  pred, truth = _as_bool_pair(pred, truth)
  if not pred.any() or not truth.any():
    raise ValueError("surface_distances needs two non-empty masks; "
                     "surface_metrics defines the empty cases.")
  rows, cols = np.nonzero(pred | truth)
  box = np.s_[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
  pred_edge, truth_edge = boundary(pred)[box], boundary(truth)[box]
  to_truth = ndimage.distance_transform_edt(~truth_edge, sampling=spacing)
  to_pred = ndimage.distance_transform_edt(~pred_edge, sampling=spacing)
  return to_truth[pred_edge], to_pred[truth_edge]


def surface_metrics(pred: np.ndarray, truth: np.ndarray,
                    spacing: tuple[float, float] = (1.0, 1.0)) -> dict[str, float]:
  """HD95 and ASSD of two binary masks [H, W], in units of `spacing` (pixels by default)."""
  pred, truth = _as_bool_pair(pred, truth)
  has_pred, has_truth = pred.any(), truth.any()
  if not has_pred and not has_truth:
    return {"hd95": 0.0, "asd": 0.0}
  if not has_pred or not has_truth:
    height, width = pred.shape
    diagonal = math.hypot((height - 1) * spacing[0], (width - 1) * spacing[1])
    return {"hd95": diagonal, "asd": diagonal}
  d_pred, d_truth = surface_distances(pred, truth, spacing)
  return {
      "hd95": float(np.percentile(np.concatenate([d_pred, d_truth]), 95)),
      "asd": float((d_pred.mean() + d_truth.mean()) / 2),
  }


def mask_metrics(pred: np.ndarray, truth: np.ndarray,
                 spacing: Spacing | None = None) -> dict[str, float]:
  """Every per-image mask metric (`MASK_METRICS`); the `_mm` ones NaN when spacing is None."""
  metrics = overlap_metrics(pred, truth)
  px = surface_metrics(pred, truth)
  metrics.update(hd95_px=px["hd95"], asd_px=px["asd"])
  if spacing is None:
    metrics.update(hd95_mm=math.nan, asd_mm=math.nan)
  else:
    mm = surface_metrics(pred, truth, (spacing.row_mm, spacing.col_mm))
    metrics.update(hd95_mm=mm["hd95"], asd_mm=mm["asd"])
  return metrics


def summarise(values: Sequence[float]) -> dict[str, float]:
  """Mean, median, std (population), min, max and count of the finite values."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  if not values.size:
    nan = math.nan
    return {"mean": nan, "median": nan, "std": nan, "min": nan, "max": nan, "count": 0}
  return {"mean": float(values.mean()), "median": float(np.median(values)),
          "std": float(values.std()), "min": float(values.min()),
          "max": float(values.max()), "count": int(values.size)}


def aggregate(rows: Sequence[Mapping[str, object]], *, metrics: Sequence[str] = MASK_METRICS,
              num_worst: int = 5, rank_by: str = "dice") -> dict[str, object]:
  """Aggregates per-image rows (dicts with 'id', 'source' and `metrics`).

  Returns {'all': {metric: summary}, 'per_source': {source: {metric: summary}},
  'worst': [{'id', 'source', rank_by}, ...]} with the `num_worst` images ranked by `rank_by`.
  """
  def by_metric(subset):
    return {m: summarise([r[m] for r in subset]) for m in metrics}

  sources = sorted({str(r["source"]) for r in rows},
                   key=lambda s: SOURCES.index(s) if s in SOURCES else len(SOURCES))
  sign = 1 if rank_by in LOWER_IS_BETTER else -1
  ranked = sorted((r for r in rows if np.isfinite(r[rank_by])),
                  key=lambda r: sign * float(r[rank_by]), reverse=True)
  return {
      "all": by_metric(rows),
      "per_source": {s: by_metric([r for r in rows if r["source"] == s]) for s in sources},
      "worst": [{"id": r["id"], "source": r["source"], rank_by: float(r[rank_by])}
                for r in ranked[:num_worst]],
  }


def _as_bool_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  pred, truth = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
  pred = pred[..., 0] if pred.ndim == 3 and pred.shape[-1] == 1 else pred
  truth = truth[..., 0] if truth.ndim == 3 and truth.shape[-1] == 1 else truth
  if pred.shape != truth.shape or pred.ndim != 2:
    raise ValueError(f"masks must be [H, W] of one shape; got pred {pred.shape}, "
                     f"truth {truth.shape}. Map predictions to the native size first "
                     "(preprocess.unletterbox).")
  return pred, truth
