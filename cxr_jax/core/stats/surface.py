"""Per-image mask metrics at native resolution (numpy/scipy), and their aggregates.

What papers report: full-size binary masks, after the prediction has been mapped back from
the model's letterboxed square. Defined behaviour (tests/test_surface.py):
- Dice, IoU, precision, recall: `metrics.binary_scores` (both empty -> 1.0, other 0/0 -> 0).
- HD95 and ASSD: both empty -> 0.0; exactly one empty -> the image diagonal (a finite worst
  case keeps a failed image in the mean, where NaN would drop it silently).
- Boundary: mask pixels with a 4-neighbour outside the mask (the image edge counts as
  outside). HD95: the larger of the two directed 95th percentiles of boundary distances
  (MONAI, DeepMind's surface-distance, the BraTS and other challenge scripts), so a false
  island that is over 5% of one boundary counts. ASSD: the mean over both boundaries' pooled
  distances, sum(d(a, B)) + sum(d(b, A)) over |A| + |B| (MONAI `symmetric=True`; Heimann
  et al. 2009).
"""

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from cxr_jax.core.stats.metrics import binary_scores
from cxr_jax.data import registry

Spacing = tuple[float, float]  # (row_mm, col_mm)


def overlap_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
  """Dice, IoU, precision and recall of two binary masks [H, W] (any dtype; nonzero = lung)."""
  pred, truth = _as_bool_pair(pred, truth)
  scores = binary_scores(pred[None], truth[None])
  return {name: float(value[0]) for name, value in scores.items()}


def boundary(mask: np.ndarray) -> np.ndarray:
  """Boundary pixels of a binary mask [H, W] -> bool [H, W] (see the module docstring)."""
  mask = np.asarray(mask, bool)
  return mask & ~ndimage.binary_erosion(mask)


def surface_distances(
  pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
  """Directed boundary distances (pred -> truth, truth -> pred), in units of `spacing`.

  Both masks must be non-empty. Only the bounding box of the two masks is transformed, which
  is exact (every boundary pixel lies inside it) and keeps full-size images fast.
  """
  pred, truth = _as_bool_pair(pred, truth)
  if not pred.any() or not truth.any():
    raise ValueError(
      "surface_distances needs two non-empty masks; surface_metrics defines the empty cases."
    )
  rows, cols = np.nonzero(pred | truth)
  box = np.s_[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
  pred_edge, truth_edge = boundary(pred)[box], boundary(truth)[box]
  to_truth = ndimage.distance_transform_edt(~truth_edge, sampling=spacing)
  to_pred = ndimage.distance_transform_edt(~pred_edge, sampling=spacing)
  return to_truth[pred_edge], to_pred[truth_edge]


def surface_metrics(
  pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)
) -> dict[str, float]:
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
    "hd95": float(max(np.percentile(d_pred, 95), np.percentile(d_truth, 95))),
    "asd": float(np.concatenate([d_pred, d_truth]).mean()),
  }


def summarise(values: Sequence[float]) -> dict[str, float]:
  """Mean, median, std (population), min, max and count of the finite values."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  if not values.size:
    nan = math.nan
    return {"mean": nan, "median": nan, "std": nan, "min": nan, "max": nan, "count": 0}
  return {
    "mean": float(values.mean()),
    "median": float(np.median(values)),
    "std": float(values.std()),
    "min": float(values.min()),
    "max": float(values.max()),
    "count": int(values.size),
  }


def aggregate(
  rows: Sequence[Mapping[str, object]],
  *,
  metrics: Sequence[str],
  num_worst: int = 5,
  rank_by: str = "dice",
  higher_is_better: bool = True,
) -> dict[str, object]:
  """Aggregates per-image rows (dicts with 'id', 'source' and `metrics`).

  Returns {'all': {metric: summary}, 'per_source': {source: {metric: summary}},
  'worst': [{'id', 'source', rank_by}, ...]} with the `num_worst` images ranked by `rank_by`
  (whose direction `higher_is_better` gives: metric_table's).
  """

  def by_metric(subset):
    return {m: summarise([r[m] for r in subset]) for m in metrics}

  known = registry.source_names()
  sources = sorted(
    {str(r["source"]) for r in rows}, key=lambda s: known.index(s) if s in known else len(known)
  )
  sign = -1 if higher_is_better else 1
  ranked = sorted(
    (r for r in rows if np.isfinite(r[rank_by])),
    key=lambda r: sign * float(r[rank_by]),
    reverse=True,
  )
  return {
    "all": by_metric(rows),
    "per_source": {s: by_metric([r for r in rows if r["source"] == s]) for s in sources},
    "worst": [
      {"id": r["id"], "source": r["source"], rank_by: float(r[rank_by])} for r in ranked[:num_worst]
    ],
  }


def _as_bool_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  pred, truth = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
  pred = pred[..., 0] if pred.ndim == 3 and pred.shape[-1] == 1 else pred
  truth = truth[..., 0] if truth.ndim == 3 and truth.shape[-1] == 1 else truth
  if pred.shape != truth.shape or pred.ndim != 2:
    raise ValueError(
      f"masks must be [H, W] of one shape; got pred {pred.shape}, "
      f"truth {truth.shape}. Map predictions to the native size first "
      "(inference.native_mask)."
    )
  return pred, truth
