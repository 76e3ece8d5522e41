"""Comparing variants: intervals over runs and paired bootstrap differences over images."""

import math
from collections.abc import Sequence

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


def paired_auc_difference(
  groups: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
  *,
  seed: int = 0,
  num_samples: int = NUM_BOOTSTRAP,
  level: float = 0.95,
) -> tuple[float, float, float]:
  """(mean over groups of AUC(a) - AUC(b), paired bootstrap interval).

  Each group is (labels, p_a, p_b) of the same images (one seed and fold): images are
  resampled within each group, both models' scores together, keeping the pairing.
  """

  def difference(index_sets):
    diffs = []
    for (labels, p_a, p_b), index in zip(groups, index_sets):
      y = labels[index]
      if y.min() != y.max():
        diffs.append(roc_auc(p_a[index], y) - roc_auc(p_b[index], y))
    return float(np.mean(diffs)) if diffs else math.nan

  groups = [tuple(np.asarray(x) for x in g) for g in groups]
  if not groups:
    return math.nan, math.nan, math.nan
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
