"""Evaluation of the heads beyond the lungs and normal/abnormal, at native resolution:
heart and clavicle masks (Dice, HD95, the cardiothoracic ratio) and findings (per-finding ROC
AUC with bootstrap intervals, their macro mean)."""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cxr_jax.core.inference.inference import native_mask
from cxr_jax.core.stats import cardiothoracic
from cxr_jax.core.stats import classification_stats
from cxr_jax.core.stats import metric_table
from cxr_jax.core.training import multilabel
from cxr_jax.data import findings as findings_lib
from cxr_jax.data import images
from cxr_jax.data import preprocess
from cxr_jax.data.records import EXTRA_STRUCTURES

STRUCTURE_METRICS = ("dice", "hd95_mm")


def structure_columns(
  record: Mapping[str, Any],
  masks: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
  lungs: np.ndarray,
  spacing: tuple[float, float] | None,
) -> dict[str, Any]:
  """evaluate's structure columns of one image from its `structure_masks`: `<structure>_dice`,
  `_hd95_mm` (where the image outlines it), `_fraction`; `cardiothoracic_ratio` (from the
  predicted heart and `lungs`, native bool masks) and `cardiothoracic_ratio_true` (where
  lungs and heart are outlined)."""
  row: dict[str, Any] = {}
  for name, (pred, truth) in masks.items():
    row[f"{name}_fraction"] = float(pred.mean())
    if truth is not None:
      scores = metric_table.mask_metrics(pred, truth, spacing)
      row.update({f"{name}_{m}": scores[m] for m in STRUCTURE_METRICS})
  row["cardiothoracic_ratio"] = cardiothoracic.cardiothoracic_ratio(masks["heart"][0], lungs)
  outlined = np.asarray(record.get("has_structures", np.zeros(3, bool)), bool)
  if outlined[0] and masks["heart"][1] is not None:
    lungs_true = images.decode_structures(record["structures"], ("lungs",))[..., 0] > 0
    row["cardiothoracic_ratio_true"] = cardiothoracic.cardiothoracic_ratio(
      masks["heart"][1], lungs_true
    )
  return row


def structure_masks(
  record: Mapping[str, Any], outputs: Mapping[str, Any], i: int, box: preprocess.Letterbox
) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
  """Image i's predicted heart and clavicles at native size (bool), each with its reference
  (None where the image does not outline it); {} unless the model segments structures."""
  if "p_structures" not in outputs:
    return {}
  outlined = np.asarray(record.get("has_structures", np.zeros(3, bool)), bool)
  truths = images.decode_structures(record["structures"], ("lungs", *EXTRA_STRUCTURES))
  return {
    name: (
      native_mask(outputs["p_structures"][i][..., k], box, clean=False),
      truths[..., k + 1] > 0 if outlined[k + 1] else None,
    )
    for k, name in enumerate(EXTRA_STRUCTURES)
  }


def finding_columns(
  batch: Mapping[str, Any], outputs: Mapping[str, Any], i: int, config
) -> dict[str, Any]:
  """evaluate's finding columns of image i (none unless the model predicts findings):
  `p_<finding>` and `y_<finding>` (the eval batch's target under config.loss.uncertain, as
  training learns it; blank where the image does not label it)."""
  row: dict[str, Any] = {}
  if "p_findings" in outputs:
    target, weight = batch["findings"][i], batch["findings_weight"][i]
    for k, name in enumerate(findings_lib.parse_names(config.model.findings)):
      row[f"p_{name}"] = float(outputs["p_findings"][i][k])
      row[f"y_{name}"] = int(target[k]) if weight[k] > 0 else ""
  return row


def summaries(tasks: Sequence[str], rows: Sequence[Mapping[str, Any]], config) -> dict[str, Any]:
  """evaluate's summary of each head beyond the lungs and normal/abnormal among `tasks`."""
  out: dict[str, Any] = {}
  if "structures" in tasks:
    out["structures"] = _per_source(structures_summary, rows)
  if "findings" in tasks:
    names = findings_lib.parse_names(config.model.findings)
    out["findings"] = _per_source(lambda r: findings_summary(r, names, int(config.seed)), rows)
  return out


def _per_source(summarize, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """`summarize(rows)`, with `per_source`: the same over each source's rows (a mixture's
  datasets, the archive's two hospitals)."""
  summary = summarize(rows)
  sources = sorted({r["source"] for r in rows})
  summary["per_source"] = {s: summarize([r for r in rows if r["source"] == s]) for s in sources}
  return summary


def structures_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Per structure: the mean of each metric over the images outlining it, and their count;
  the cardiothoracic ratio's mean absolute error where the truth has one."""
  out: dict[str, Any] = {}
  for name in EXTRA_STRUCTURES:
    scored = [r for r in rows if f"{name}_dice" in r]
    out[name] = {"count": len(scored)}
    for metric in STRUCTURE_METRICS:
      values = [float(r[f"{name}_{metric}"]) for r in scored]
      finite = [v for v in values if np.isfinite(v)]
      out[name][metric] = float(np.mean(finite)) if finite else float("nan")
  pairs = [
    (r["cardiothoracic_ratio"], r["cardiothoracic_ratio_true"])
    for r in rows
    if "cardiothoracic_ratio_true" in r
    and np.isfinite(r["cardiothoracic_ratio"])
    and np.isfinite(r["cardiothoracic_ratio_true"])
  ]
  out["cardiothoracic_ratio_mae"] = (
    float(np.mean([abs(p - t) for p, t in pairs])) if pairs else float("nan")
  )
  out["cardiothoracic_ratio_count"] = len(pairs)
  return out


def findings_summary(
  rows: Sequence[Mapping[str, Any]], findings: Sequence[str], seed: int
) -> dict[str, Any]:
  """Per finding: ROC AUC over the images labelling it, a bootstrap 95% interval, the counts;
  `macro_auc`: the mean of the finite AUCs."""
  per = {}
  for name in findings:
    labelled = [r for r in rows if r.get(f"y_{name}", "") != ""]
    y = np.array([float(r[f"y_{name}"]) for r in labelled])
    p = np.array([float(r[f"p_{name}"]) for r in labelled])
    auc = classification_stats.roc_auc(p, y) if labelled else float("nan")
    low, high = (
      classification_stats.bootstrap_auc_interval(y > 0.5, p, seed=seed)
      if labelled
      else (float("nan"), float("nan"))
    )
    per[name] = {
      "auc": auc,
      "auc_ci": [low, high],
      "positives": int((y > 0.5).sum()),
      "labelled": len(labelled),
    }
  return {"per_finding": per, "macro_auc": multilabel.macro_auc([v["auc"] for v in per.values()])}


def eval_fields(config) -> list[str]:
  """evaluate's CSV columns beyond evaluation.CSV_FIELDS for a model of `config` (its rows
  are streamed, so the header is known before any image is scored)."""
  fields = []
  if config.model.get("structures", False):
    for name in EXTRA_STRUCTURES:
      fields += [f"{name}_fraction", *(f"{name}_{m}" for m in STRUCTURE_METRICS)]
    fields += ["cardiothoracic_ratio", "cardiothoracic_ratio_true"]
  for name in findings_lib.parse_names(config.model.get("findings", "")):
    fields += [f"p_{name}", f"y_{name}"]
  return fields


def prediction_fields(config) -> list[str]:
  """predict's CSV columns beyond its own for a model of `config` (None: an exported model,
  which has neither structures nor findings): `prediction_columns`' keys."""
  if config is None:
    return []
  fields = []
  if config.model.get("structures", False):
    fields += [f"{name}_fraction" for name in EXTRA_STRUCTURES] + ["cardiothoracic_ratio"]
  return fields + [f"p_{n}" for n in findings_lib.parse_names(config.model.get("findings", ""))]


def prediction_columns(prediction, config) -> dict[str, str]:
  """predict's CSV columns of one `inference.Prediction` beyond the lungs: structure
  fractions and the cardiothoracic ratio (`cardiothoracic.prediction_columns`), and
  `p_<finding>` per name of config.model.findings."""
  row = {}
  if prediction.structures is not None:
    lungs = prediction.output_mask
    row.update(cardiothoracic.prediction_columns(lungs, prediction.structures))
  if prediction.p_findings is not None:
    names = findings_lib.parse_names(config.model.findings)
    row.update({f"p_{n}": f"{p:.6f}" for n, p in zip(names, prediction.p_findings, strict=True)})
  return row
