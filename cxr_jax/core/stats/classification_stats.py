"""Statistics of p(abnormal) against labels (numpy): ROC and its AUC, a bootstrap interval,
Youden's threshold, sensitivity and specificity, reliability bins and the calibration error."""

import math
from typing import Any

import numpy as np

NUM_BOOTSTRAP = 1000
NUM_CALIBRATION_BINS = 10


def roc_auc(scores: np.ndarray, labels: np.ndarray, weight: np.ndarray | None = None) -> float:
  """Area under the ROC curve; ties between a positive and a negative count one half.

  Equal to the fraction of (positive, negative) pairs ranked correctly (Mann-Whitney U with
  average ranks), each pair weighted by the product of the two weights. O(n log n).

  Args:
    scores: [N] scores, higher means more likely positive.
    labels: [N] 1 positive, 0 negative.
    weight: [N] non-negative; examples with weight 0 are ignored. None: all 1.

  Returns:
    The AUC, or NaN when there is no positive or no negative example with weight > 0.
  """
  scores = np.asarray(scores, np.float64).ravel()
  labels = np.asarray(labels).ravel()
  weight = np.ones_like(scores) if weight is None else np.asarray(weight, np.float64).ravel()
  if not scores.shape == labels.shape == weight.shape:
    raise ValueError(
      f"scores {scores.shape}, labels {labels.shape} and weight {weight.shape} "
      "must have the same length."
    )
  keep = weight > 0
  scores, weight = scores[keep], weight[keep]
  positive = labels[keep] == 1
  w_pos, w_neg = np.where(positive, weight, 0.0), np.where(positive, 0.0, weight)
  total_pos, total_neg = w_pos.sum(), w_neg.sum()
  if total_pos <= 0 or total_neg <= 0:
    return float("nan")
  unique, group = np.unique(scores, return_inverse=True)  # ascending; ties share a group
  pos_per_group = np.bincount(group, w_pos, len(unique))
  neg_per_group = np.bincount(group, w_neg, len(unique))
  neg_below = np.cumsum(neg_per_group) - neg_per_group
  wins = np.sum(pos_per_group * (neg_below + 0.5 * neg_per_group))
  return float(wins / (total_pos * total_neg))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
  """{'fpr', 'tpr', 'threshold'}: operating points of `score >= threshold`, from (0, 0)."""
  labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, np.float64)
  thresholds = np.concatenate([[np.inf], np.unique(scores)[::-1]])
  predicted = scores[None, :] >= thresholds[:, None]
  tpr = (predicted & labels).sum(1) / max(int(labels.sum()), 1)
  fpr = (predicted & ~labels).sum(1) / max(int((~labels).sum()), 1)
  return {"fpr": fpr, "tpr": tpr, "threshold": thresholds}


def bootstrap_auc_interval(
  labels: np.ndarray,
  scores: np.ndarray,
  *,
  seed: int,
  num_samples: int = NUM_BOOTSTRAP,
  level: float = 0.95,
) -> tuple[float, float]:
  """Percentile bootstrap interval of the AUC (resampling images with replacement).

  Resamples holding a single class have no AUC and are drawn again; seeded, so the same
  predictions always give the same interval.
  """
  labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, np.float64)
  if labels.all() or not labels.any():
    return math.nan, math.nan
  rng = np.random.default_rng(seed)
  aucs = []
  while len(aucs) < num_samples:
    index = rng.integers(0, len(labels), len(labels))
    if labels[index].any() and not labels[index].all():
      aucs.append(roc_auc(scores=scores[index], labels=labels[index]))
  alpha = (1 - level) / 2
  lo, hi = np.quantile(aucs, [alpha, 1 - alpha])
  return float(lo), float(hi)


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
  """The threshold maximising sensitivity + specificity - 1 (ties: the highest threshold).

  Returned as the midpoint between the chosen score and the next lower one, so a test score
  equal to a validation score is not decided by floating-point luck. NaN with one class.
  """
  labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, np.float64)
  if labels.all() or not labels.any():
    return math.nan
  curve = roc_curve(labels, scores)
  # Rounded so equal J in exact arithmetic ties; the first (highest threshold) wins.
  best = int(np.argmax(np.round(curve["tpr"] - curve["fpr"], 12)))
  chosen = curve["threshold"][best]
  if not np.isfinite(chosen):
    return float(scores.max()) + 1e-6
  lower = scores[scores < chosen]
  return float((chosen + lower.max()) / 2) if lower.size else float(chosen) / 2


def sensitivity_specificity(
  labels: np.ndarray, scores: np.ndarray, threshold: float
) -> tuple[float, float]:
  """(sensitivity, specificity) of `score >= threshold`; NaN for a class that is absent."""
  labels, predicted = np.asarray(labels).astype(bool), np.asarray(scores) >= threshold
  sens = (predicted & labels).sum() / labels.sum() if labels.any() else math.nan
  spec = (~predicted & ~labels).sum() / (~labels).sum() if (~labels).any() else math.nan
  return float(sens), float(spec)


def reliability_bins(
  labels: np.ndarray, probs: np.ndarray, num_bins: int = NUM_CALIBRATION_BINS
) -> dict[str, np.ndarray]:
  """Equal-width bins of p(abnormal): {'lower', 'upper', 'count', 'confidence', 'accuracy'}.

  confidence: the bin's mean predicted probability; accuracy: its observed fraction of
  abnormal images (NaN for an empty bin). The last bin includes 1.0.
  """
  labels, probs = np.asarray(labels, np.float64), np.asarray(probs, np.float64)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  which = np.clip(np.digitize(probs, edges[1:-1], right=False), 0, num_bins - 1)
  count = np.bincount(which, minlength=num_bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    confidence = np.bincount(which, probs, num_bins) / count
    accuracy = np.bincount(which, labels, num_bins) / count
  return {
    "lower": edges[:-1],
    "upper": edges[1:],
    "count": count,
    "confidence": confidence,
    "accuracy": accuracy,
  }


def expected_calibration_error(
  labels: np.ndarray, probs: np.ndarray, num_bins: int = NUM_CALIBRATION_BINS
) -> float:
  """ECE of p(abnormal): sum over bins of (count / N) * |observed - mean predicted|."""
  bins = reliability_bins(labels, probs, num_bins)
  used = bins["count"] > 0
  if not used.any():
    return math.nan
  gaps = np.abs(bins["accuracy"][used] - bins["confidence"][used])
  return float((bins["count"][used] * gaps).sum() / bins["count"].sum())


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
  """p -> sigmoid(logit(p) / T): T > 1 softens over-confident probabilities, order kept."""
  p = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
  return 1.0 / (1.0 + np.exp(-np.log(p / (1 - p)) / temperature))


def fit_temperature(labels: np.ndarray, probs: np.ndarray) -> float:
  """The temperature minimising the negative log-likelihood of `labels` (Guo et al. 2017),
  searched over T in [0.05, 20] on a log grid; 1.0 when a class is missing."""
  labels = np.asarray(labels).astype(bool)
  if labels.all() or not labels.any():
    return 1.0
  grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 801))

  def nll(t: float) -> float:
    p = np.clip(apply_temperature(probs, t), 1e-12, 1 - 1e-12)
    return float(-np.mean(np.where(labels, np.log(p), np.log1p(-p))))

  return float(grid[int(np.argmin([nll(t) for t in grid]))])


def classification_summary(
  labels: np.ndarray, probs: np.ndarray, *, threshold: float, threshold_from: str, seed: int
) -> dict[str, Any]:
  """Every classifier number evaluate reports, at the given (validation-chosen) threshold."""
  labels, probs = np.asarray(labels).astype(bool), np.asarray(probs, np.float64)
  lo, hi = bootstrap_auc_interval(labels, probs, seed=seed)
  sens, spec = sensitivity_specificity(labels, probs, threshold)
  return {
    "num_images": int(labels.size),
    "num_abnormal": int(labels.sum()),
    "accuracy": float(((probs >= 0.5) == labels).mean()),
    "accuracy_at_threshold": float(((probs >= threshold) == labels).mean()),
    "auc": roc_auc(scores=probs, labels=labels),
    "auc_ci95": [lo, hi],
    "threshold": threshold,
    "threshold_from": threshold_from,
    "sensitivity": sens,
    "specificity": spec,
    "ece": expected_calibration_error(labels, probs),
    "bootstrap_samples": NUM_BOOTSTRAP,
    "bootstrap_seed": seed,
  }
