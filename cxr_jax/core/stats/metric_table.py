"""One table of the metrics cxr_jax reports: name, title, direction, unit, the one-line
definition that test.json and the report print, and where it is computed.

The best-checkpoint choice (`lower_is_better`), evaluate's per-image scores (`mask_metrics`,
`MASK`), the report's tables and the results' columns (`RESULTS`) iterate it: a new
native-resolution metric is one entry with its `per_image`, a new results column one entry
with its `result`. Validation metrics (clu collections, `metrics.py`) are named after entries
here; a head's loss is `<head>_loss` and the trained weights' metrics under an EMA `online_*`.
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from cxr_jax.core.stats import surface


class MaskPair:
  """A predicted and a reference mask [H, W] at native size (and the pixel spacing, mm), with
  the overlap counts and boundary distances computed once for every metric that needs them."""

  def __init__(self, pred: np.ndarray, truth: np.ndarray, spacing: surface.Spacing | None):
    self.pred, self.truth, self.spacing = pred, truth, spacing

  @functools.cached_property
  def overlap(self) -> dict[str, float]:
    return surface.overlap_metrics(self.pred, self.truth)

  @property
  def area_ratio(self) -> float:
    predicted, reference = int(np.count_nonzero(self.pred)), int(np.count_nonzero(self.truth))
    if not reference:
      return 1.0 if not predicted else math.inf
    return predicted / reference

  @functools.cached_property
  def px(self) -> dict[str, float]:
    return surface.surface_metrics(self.pred, self.truth)

  @functools.cached_property
  def mm(self) -> dict[str, float]:
    if self.spacing is None:
      return {"hd95": math.nan, "asd": math.nan}
    return surface.surface_metrics(self.pred, self.truth, self.spacing)


Summary = Mapping[str, Any]  # evaluate's <split>.json
Validation = Mapping[str, Any]  # the metrics.jsonl validation row at the evaluated step


@dataclasses.dataclass(frozen=True)
class Metric:
  """One reported metric.

  Attributes:
    name: its key in test.json, the CSVs, metrics.jsonl and config.best_metric.
    title: how tables head it.
    higher_is_better: its direction (the best checkpoint, the worst cases, results).
    unit: '' (a fraction or a score), 'px' or 'mm'.
    definition: one line, printed in test.json's notes and the report.
    where: what computes it.
    per_image: the native-resolution score of one mask pair (None: not a mask metric).
    result: its value in a results row, from test.json and the validation row (None: not a
      results column).
  """

  name: str
  title: str
  higher_is_better: bool
  unit: str
  definition: str
  where: str
  per_image: Callable[[MaskPair], float] | None = None
  result: Callable[[Summary, Validation], Any] | None = None

  @property
  def digits(self) -> int:
    """Decimals a table shows."""
    return 2 if self.unit else 4


def _mask_stat(name: str, stat: str = "mean") -> Callable[[Summary, Validation], Any]:
  """A mask metric's `stat` over the images (test.json's raw masks); None where the
  evaluation has no such metric (no segmentation, or written before the metric existed)."""

  def read(summary: Summary, validation: Validation) -> Any:
    if "segmentation" not in summary:
      return None
    return summary["segmentation"]["raw"]["all"].get(name, {}).get(stat)

  return read


def _summary(*keys: str) -> Callable[[Summary, Validation], Any]:
  def read(summary: Summary, validation: Validation) -> Any:
    node: Any = summary
    for key in keys:
      node = node.get(key) if isinstance(node, Mapping) else None
    return node

  return read


_OVERLAP = "stats/surface.overlap_metrics (validation: stats/metrics.binary_scores)"
_SURFACE = "stats/surface.surface_metrics"
_BOTH_EMPTY = "both masks empty: 1; one empty: 0"
_ONE_EMPTY = "both empty: 0; one empty: the image diagonal"

# fmt: off
# (one metric a line: the table reads as a table)
TABLE = (
  Metric("dice", "Dice", True, "", f"2|P∩R| / (|P| + |R|) of the predicted and reference masks; {_BOTH_EMPTY}", _OVERLAP, lambda p: p.overlap["dice"], _mask_stat("dice")),
  Metric("iou", "IoU", True, "", f"|P∩R| / |P∪R|; {_BOTH_EMPTY}", _OVERLAP, lambda p: p.overlap["iou"]),
  Metric("precision", "precision", True, "", f"|P∩R| / |P|; {_BOTH_EMPTY}", _OVERLAP, lambda p: p.overlap["precision"]),
  Metric("recall", "recall", True, "", f"|P∩R| / |R|; {_BOTH_EMPTY}", _OVERLAP, lambda p: p.overlap["recall"]),
  Metric("area_ratio", "area ratio", True, "", "|P| / |R|: the predicted lung area over the reference's (1 when they agree; below 1: lung missed, as consolidated bases are); 1 when both are empty; results show the median", "stats/metric_table.MaskPair.area_ratio", lambda p: p.area_ratio, _mask_stat("area_ratio", "median")),
  Metric("hd95_px", "HD95 px", False, "px", f"the larger of the two directed 95th percentiles of boundary-to-boundary distances (MONAI's convention); {_ONE_EMPTY}", _SURFACE, lambda p: p.px["hd95"], _mask_stat("hd95_px")),
  Metric("asd_px", "ASSD px", False, "px", f"both boundaries' distances to the other pooled: (sum d(a, R) + sum d(r, P)) / (|∂P| + |∂R|) (MONAI, symmetric=True); {_ONE_EMPTY}", _SURFACE, lambda p: p.px["asd"], _mask_stat("asd_px")),
  Metric("hd95_mm", "HD95 mm", False, "mm", "HD95 in millimetres, where the image's pixel spacing is known", _SURFACE, lambda p: p.mm["hd95"]),
  Metric("asd_mm", "ASSD mm", False, "mm", "ASSD in millimetres, where the image's pixel spacing is known", _SURFACE, lambda p: p.mm["asd"]),
  Metric("dice_worst10", "Dice worst tenth", True, "", "mean Dice of the run's worst tenth of masks (ceil(n / 10)): its hardest images", "stats/paired_stats.worst_tenth_mean", None, _summary("segmentation", "dice_worst_tenth")),
  Metric("qc_auroc", "QC AUROC", True, "", "AUROC of the masks' uncertainty for finding those with Dice < 0.95", "workflows/split_summaries.quality_summary", None, lambda s, v: (s.get("segmentation", {}).get("quality") or {}).get("auroc")),
  Metric("loss", "loss", False, "", "a head's training loss on validation (<head>_loss): BCE + soft Dice, or cross-entropy", "training/losses"),
  Metric("auc", "AUC", True, "", "area under the ROC curve of p(abnormal) (ties count one half)", "stats/classification_stats.roc_auc", None, _summary("classification", "auc")),
  Metric("accuracy", "accuracy", True, "", "fraction of images whose p(abnormal) >= 0.5 matches the label", "stats/classification_stats", None, _summary("classification", "accuracy")),
  Metric("sensitivity", "sensitivity", True, "", "abnormal images called abnormal (at 0.5 in validation, at Youden's threshold in evaluate)", "stats/classification_stats"),
  Metric("specificity", "specificity", True, "", "normal images called normal (at 0.5 in validation, at Youden's threshold in evaluate)", "stats/classification_stats"),
  Metric("ece", "ECE", False, "", "expected calibration error of p(abnormal) over equal-width bins", "stats/classification_stats.expected_calibration_error", None, _summary("classification", "ece")),
  Metric("ece_calibrated", "ECE calibrated", False, "", "ECE after the temperature fitted on validation", "stats/classification_stats.fit_temperature", None, _summary("classification", "calibration", "ece_after")),
  Metric("heart_dice", "heart Dice", True, "", "Dice of the heart mask over the images outlining it (model.structures)", "training/anatomy; evaluate: workflows/task_scores", None, _summary("structures", "heart", "dice")),
  Metric("clavicles_dice", "clavicles Dice", True, "", "Dice of the clavicles' mask over the images outlining them (model.structures)", "training/anatomy; evaluate: workflows/task_scores", None, _summary("structures", "clavicles", "dice")),
  Metric("ctr_mae", "CTR MAE", False, "", "mean absolute error of the cardiothoracic ratio (widest heart / widest thorax) from the predicted masks, over images outlining lungs and heart", "stats/cardiothoracic; evaluate: workflows/task_scores", None, _summary("structures", "cardiothoracic_ratio_mae")),
  Metric("findings_auc", "findings AUC", True, "", "macro mean of each finding's ROC AUC over the images labelling it (model.findings)", "training/multilabel; evaluate: workflows/task_scores", None, _summary("findings", "macro_auc")),
  Metric("val_dice", "val Dice", True, "", "validation Dice (model resolution) at the evaluated step of the EMA weights (runs with an EMA)", "metrics.jsonl", None, lambda s, v: v.get("dice") if "online_dice" in v else None),
  Metric("val_online_dice", "val Dice online", True, "", "the same of the trained weights themselves: with val_dice, the EMA's paired effect", "metrics.jsonl", None, lambda s, v: v.get("online_dice")),
)
# fmt: on
BY_NAME = {metric.name: metric for metric in TABLE}
MASK = tuple(m for m in TABLE if m.per_image is not None)  # per image, native resolution
MASK_METRICS = tuple(m.name for m in MASK)
RESULTS = tuple(m for m in TABLE if m.result is not None)  # results columns, in this order


def lookup(name: str) -> Metric:
  """The entry of a metric name as logged: `online_dice` is dice's, `seg_loss` loss's."""
  base = name.removeprefix("online_")
  base = "loss" if base.endswith("_loss") else base
  if base not in BY_NAME:
    raise KeyError(f"metric {name!r} is not in stats/metric_table.py; known: {sorted(BY_NAME)}")
  return BY_NAME[base]


def lower_is_better(name: str) -> bool:
  """The direction of a metric (KeyError for a name the table does not hold)."""
  return not lookup(name).higher_is_better


def mask_metrics(
  pred: np.ndarray, truth: np.ndarray, spacing: surface.Spacing | None = None
) -> dict[str, float]:
  """Every native-resolution mask metric (`MASK`) of two binary masks [H, W]; the `_mm` ones
  NaN when spacing is None."""
  pair = MaskPair(pred, truth, spacing)
  return {m.name: float(m.per_image(pair)) for m in MASK}


def definitions(metrics=MASK) -> dict[str, str]:
  """{name: one-line definition}: test.json's notes and the report's."""
  return {m.name: m.definition for m in metrics}
