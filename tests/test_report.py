"""The report: one HTML file with its figures inline, and the same figures as PNG files."""

import base64
import re

import numpy as np

from cxr_jax import figures
from cxr_jax import report
from cxr_jax.core.stats import classification_stats
from cxr_jax.core.stats import metric_table
from cxr_jax.data import registry
from cxr_jax.workflows import evaluation
from cxr_jax.workflows import split_summaries


def _result(num: int = 7, attention: bool = True) -> evaluation.SplitResult:
  rng = np.random.default_rng(0)
  rows, cases = [], {}
  for k in range(num):
    truth = np.zeros((40, 50), bool)
    truth[8:32, 6:22] = truth[8:32, 28:44] = True
    pred = truth.copy()
    pred[8 : 8 + 2 * k] = False  # worse with k
    source = registry.source_names()[k % 3]
    row = {
      "id": f"img{k}",
      "source": source,
      "label": k % 2,
      "has_mask": 1,
      "p_abnormal": float(np.clip(0.5 + (k % 2 - 0.5) * 0.6 + rng.normal(0, 0.2), 0, 1)),
    }
    row.update(metric_table.mask_metrics(pred, truth))
    row.update({f"{m}_post": v for m, v in metric_table.mask_metrics(pred, truth).items()})
    rows.append(row)
    gates = [rng.random((16, 16)), rng.random((8, 8))] if attention and k < 2 else None
    image = (rng.random((40, 50)) * 80 + truth * 120).astype(np.uint8)
    model_input = np.pad(image[:, 5:45], ((0, 0), (0, 0))).astype(np.float32) / 255
    cases[row["id"]] = evaluation.Case(
      row["id"], source, image, truth, pred, pred, gates, model_input if gates else None
    )
  labels = np.array([r["label"] for r in rows])
  probs = np.array([r["p_abnormal"] for r in rows])
  attention = [c for c in cases.values() if c.attention]
  return evaluation.SplitResult(rows, cases, labels, probs, attention)


def _summary(result: evaluation.SplitResult) -> dict:
  from configs import default

  config = default.get_config()
  return {
    "model": "attention_unet",
    "dataset": "synthetic",
    "workdir": "/tmp/x",
    "checkpoint": "best",
    "step": 6,
    "num_images": len(result.rows),
    "image_size": 32,
    "created": "now",
    "segmentation": split_summaries.segmentation_summary(result.rows, config),
    "classification": classification_stats.classification_summary(
      result.labels, result.probs, threshold=0.5, threshold_from="validation", seed=0
    ),
  }


def test_report_has_every_section_and_figure(tmp_path):
  result = _result()
  path = report.write_report(str(tmp_path), "test", _summary(result), result)
  html = open(path).read()
  for title in (
    "Segmentation at native resolution",
    "Per source",
    "worst images",
    "Best, median and worst cases",
    "Dice distribution",
    "Attention maps",
    "Classification",
    "ROC curve",
    "Reliability diagram",
  ):
    assert title in html, title
  images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', html)
  names = [name for name, _ in images]
  assert names == [
    "test_cases.png",
    "test_dice.png",
    "test_attention.png",
    "test_roc.png",
    "test_reliability.png",
  ]
  for name, data in images:  # inline copy == the PNG file beside the report
    png = base64.b64decode(data)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / name).read_bytes() == png
  assert 'src="http' not in html  # self-contained
  for source in ("montgomery", "shenzhen", "synthetic"):
    assert source in html


def test_best_median_worst_selection():
  rows = [{"id": str(k), "has_mask": 1, "dice": d} for k, d in enumerate([0.9, 0.5, 0.7])]
  rows.append({"id": "no_mask", "has_mask": 0, "dice": float("nan")})
  picks = figures.select_cases(rows)
  assert [(role, r["id"]) for role, r in picks] == [("best", "0"), ("median", "2"), ("worst", "1")]


def test_segmentation_only_report_has_no_classifier_figures(tmp_path):
  result = _result(attention=False)
  summary = _summary(result)
  del summary["classification"]
  html = open(report.write_report(str(tmp_path), "validation", summary, result)).read()
  assert "ROC curve" not in html and "Attention maps" not in html
  assert (tmp_path / "validation_cases.png").exists()
  assert not (tmp_path / "validation_roc.png").exists()
