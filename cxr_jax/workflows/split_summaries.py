"""evaluate's summaries of the lungs and normal/abnormal heads over one split's per-image rows:
mask metrics (raw and post-processed, per source, the worst cases), the mask quality control,
and classification (AUC with its interval, the validation threshold, calibration, per source).
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from cxr_jax.core.inference.inference import MASK_THRESHOLD
from cxr_jax.core.stats import classification_stats
from cxr_jax.core.stats import metric_table
from cxr_jax.core.stats import paired_stats
from cxr_jax.core.stats import surface
from cxr_jax.data import registry

NUM_WORST = 5
POOR_DICE = 0.95  # quality control: how well `uncertainty` finds masks below this Dice


def segmentation_summary(
  rows: Sequence[Mapping[str, Any]], config: ml_collections.ConfigDict
) -> dict[str, Any]:
  masked = [r for r in rows if r["has_mask"]]
  post_rows = [
    {"id": r["id"], "source": r["source"], **{m: r[f"{m}_post"] for m in metric_table.MASK_METRICS}}
    for r in masked
  ]
  raw = surface.aggregate(masked, metrics=metric_table.MASK_METRICS, num_worst=NUM_WORST)
  post = surface.aggregate(post_rows, metrics=metric_table.MASK_METRICS, num_worst=NUM_WORST)
  with_mm = [r for r in masked if r.get("spacing_estimated") != ""]
  estimated = sum(r.get("spacing_estimated") == 1 for r in with_mm)
  return {
    "num_images_with_mask": len(masked),
    "primary": "postprocessed" if config.postprocess else "raw",
    "raw": raw,
    "postprocessed": post,
    "dice": raw["all"]["dice"]["mean"],
    "dice_postprocessed": post["all"]["dice"]["mean"],
    "dice_worst_tenth": paired_stats.worst_tenth_mean([r["dice"] for r in masked]),
    "notes": {
      "threshold": f"p(lung) >= {MASK_THRESHOLD} after bilinear mapping to the native size",
      "postprocessed": "two largest 8-connected components kept, holes filled",
      **metric_table.definitions(),  # each mask metric's one line (MONAI's distances)
      "mm": (
        f"{len(with_mm)} of {len(masked)} images have a known pixel spacing"
        + (f", estimated for {estimated} (resized images)" if estimated else "")
      ),
    },
  }


def quality_summary(rows: Sequence[Mapping[str, Any]], threshold: float) -> dict[str, Any]:
  """How well the masks' uncertainty finds the poor ones (Dice < POOR_DICE): AUROC over the
  images with a reference mask, and which masks the threshold flags."""
  scored = [r for r in rows if r.get("uncertainty") is not None]
  masked = [r for r in scored if r["has_mask"]]
  poor = np.array([r["dice"] < POOR_DICE for r in masked], np.int64)
  flagged = [r for r in scored if r["flagged"]]
  return {
    "score": "uncertainty: binary entropy of p(lung) summed over pixels per predicted lung "
    "pixel (TTA-averaged p under config.tta)",
    "threshold": threshold,
    "num_images": len(scored),
    "num_flagged": len(flagged),
    "flagged": [r["id"] for r in flagged],
    "poor_below": POOR_DICE,
    "num_poor": int(poor.sum()),
    "flagged_poor": int(sum(r["has_mask"] and r["dice"] < POOR_DICE for r in flagged)),
    "auroc": classification_stats.roc_auc(
      scores=np.array([r["uncertainty"] for r in masked], np.float64), labels=poor
    )
    if masked
    else float("nan"),
  }


def classification_summary(
  result: Any,
  validation: Any,
  split: str,
  config: ml_collections.ConfigDict,
  temperature: float,
) -> dict[str, Any]:
  labels, probs = validation.labels, validation.probs
  origin = "validation (the evaluated split)" if split == "validation" else "validation"
  threshold = classification_stats.youden_threshold(labels, probs)
  if not math.isfinite(threshold):
    threshold, origin = 0.5, "0.5 (validation has a single class)"
  summary = classification_stats.classification_summary(
    result.labels, result.probs, threshold=threshold, threshold_from=origin, seed=int(config.seed)
  )
  # Temperature scaling, fitted on validation: calibrates p(abnormal), AUC unchanged.
  calibrated = classification_stats.apply_temperature(result.probs, temperature)
  summary["calibration"] = {
    "temperature": temperature,
    "fitted_on": "validation",
    "ece_before": summary["ece"],
    "ece_after": classification_stats.expected_calibration_error(result.labels, calibrated),
  }
  per_source = {}
  for name in registry.source_names():
    index = np.array([r["source"] == name for r in result.rows], bool)
    if index.any():
      per_source[name] = {
        "num_images": int(index.sum()),
        "auc": classification_stats.roc_auc(
          scores=result.probs[index], labels=result.labels[index]
        ),
        "accuracy": float(((result.probs[index] >= 0.5) == result.labels[index]).mean()),
      }
  summary["per_source"] = per_source
  return summary
