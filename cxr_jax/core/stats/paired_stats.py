"""Comparing variants: intervals over runs and paired bootstrap differences over images."""

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

from cxr_jax.core.stats.classification_stats import roc_auc

NUM_BOOTSTRAP = 1000


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
  """Student-t interval of the mean of `values` (runs: seeds and folds); NaN for one run."""
  values = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
  if values.size < 2:
    return math.nan, math.nan
  half = stats.t.ppf((1 + level) / 2, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size)
  return float(values.mean() - half), float(values.mean() + half)


def paired_mean_difference(
  a: np.ndarray,
  b: np.ndarray,
  *,
  seed: int = 0,
  num_samples: int = NUM_BOOTSTRAP,
  level: float = 0.95,
) -> tuple[float, float, float]:
  """(mean of a - b, percentile bootstrap interval) for per-image scores of the same images."""
  diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  if diff.size == 0:
    return math.nan, math.nan, math.nan
  rng = np.random.default_rng(seed)
  means = diff[rng.integers(0, diff.size, (num_samples, diff.size))].mean(axis=1)
  lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
  return float(diff.mean()), float(lo), float(hi)


def worst_tenth_mean(values: Sequence[float]) -> float:
  """The mean of the lowest tenth of the finite `values` (ceil(n / 10) of them, at least one):
  how a model does on its hardest images (e.g. Dice on diseased lungs)."""
  values = np.sort(np.asarray([v for v in values if math.isfinite(v)], np.float64))
  if not values.size:
    return math.nan
  return float(values[: max(1, math.ceil(values.size / 10))].mean())


def paired_group_difference(
  groups: Sequence[tuple[np.ndarray, ...]],
  statistic: Callable[..., float],
  *,
  seed: int = 0,
  num_samples: int = NUM_BOOTSTRAP,
  level: float = 0.95,
) -> tuple[float, float, float]:
  """(mean over groups of `statistic(*group)`, paired bootstrap interval).

  Each group holds arrays over the same images (one seed and fold), e.g. (labels, p_a, p_b)
  with statistic AUC(a) - AUC(b): images are resampled within each group, all arrays
  together, keeping the pairing. NaN statistics (a resample of one class) are left out.
  """
  groups = [tuple(np.asarray(x) for x in g) for g in groups]
  if not groups:
    return math.nan, math.nan, math.nan

  def difference(index_sets):
    diffs = [statistic(*(x[index] for x in g)) for g, index in zip(groups, index_sets)]
    diffs = [d for d in diffs if math.isfinite(d)]
    return float(np.mean(diffs)) if diffs else math.nan

  point = difference([np.arange(len(g[0])) for g in groups])
  rng = np.random.default_rng(seed)
  samples = [
    difference([rng.integers(0, len(g[0]), len(g[0])) for g in groups]) for _ in range(num_samples)
  ]
  samples = [s for s in samples if math.isfinite(s)]
  if not samples:
    return point, math.nan, math.nan
  lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
  return point, float(lo), float(hi)


def paired_auc_difference(
  groups: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], **kwargs
) -> tuple[float, float, float]:
  """(mean over groups of AUC(a) - AUC(b), paired bootstrap interval); each group is
  (labels, p_a, p_b) of the same images (`paired_group_difference`)."""

  def auc_difference(labels, p_a, p_b):
    if labels.min() == labels.max():
      return math.nan
    return roc_auc(p_a, labels) - roc_auc(p_b, labels)

  return paired_group_difference(groups, auc_difference, **kwargs)


def paired_worst_tenth_difference(
  groups: Sequence[tuple[np.ndarray, np.ndarray]], **kwargs
) -> tuple[float, float, float]:
  """(mean over groups of worst_tenth_mean(a) - worst_tenth_mean(b), paired bootstrap
  interval): each model's own hardest tenth of the same images (`paired_group_difference`)."""
  return paired_group_difference(
    groups, lambda a, b: worst_tenth_mean(a) - worst_tenth_mean(b), **kwargs
  )
