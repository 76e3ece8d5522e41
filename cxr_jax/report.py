"""The evaluation report: one self-contained HTML file and the same figures as PNG files.

`write_report(out_dir, split, summary, result)` writes `<split>_report.html` (every image
inline) and beside it `<split>_cases.png`, `<split>_dice.png`, `<split>_attention.png`
(segmenters) and `<split>_roc.png`, `<split>_reliability.png` (classifiers). matplotlib with
the Agg backend: no display needed.
"""

import base64
import html
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from cxr_jax import figures
from cxr_jax.core.stats import metric_table
from cxr_jax.core.training import heads

# ----- HTML -----


def _fmt(value: Any, digits: int = 4) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "&ndash;"
  if isinstance(value, (float, np.floating)):
    return f"{value:.{digits}f}"
  return html.escape(str(value))


def _save(fig, path: str) -> str:
  """Saves the figure as PNG at `path` and returns it as a base64 <img> tag."""
  data = figures.png_bytes(fig)
  epath.Path(path).write_bytes(data)
  alt = html.escape(os.path.basename(path))
  return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def _aggregate_table(aggregate: Mapping[str, Any]) -> str:
  head = "".join(f"<th>{t}</th>" for t in ("metric", "mean", "median", "std", "min", "max", "n"))
  body = []
  for metric in metric_table.MASK:
    stats = aggregate["all"][metric.name]
    body.append(
      f"<tr><td>{metric.title}</td>"
      + "".join(
        f"<td>{_fmt(stats[k], metric.digits)}</td>" for k in ("mean", "median", "std", "min", "max")
      )
      + f"<td>{stats['count']}</td></tr>"
    )
  return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _per_source_table(segmentation: Mapping[str, Any]) -> str:
  metrics = metric_table.MASK
  head = (
    "<tr><th>source</th><th>variant</th><th>n</th>"
    + "".join(f"<th>{m.title} (mean &plusmn; std)</th>" for m in metrics)
    + "</tr>"
  )
  body = []
  for source in segmentation["raw"]["per_source"]:
    for variant in ("raw", "postprocessed"):
      stats = segmentation[variant]["per_source"][source]
      cells = []
      for m in metrics:
        mean, std = stats[m.name]["mean"], stats[m.name]["std"]
        cells.append(
          f"<td>{_fmt(mean, m.digits)} &plusmn; {_fmt(std, m.digits)}</td>"
          if figures.is_finite_number(mean)
          else "<td>&ndash;</td>"
        )
      body.append(
        f"<tr><td>{html.escape(source)}</td><td>{variant}</td>"
        f"<td>{stats['dice']['count']}</td>{''.join(cells)}</tr>"
      )
  return f"<table>{head}{''.join(body)}</table>"


def _worst_list(aggregate: Mapping[str, Any]) -> str:
  items = "".join(
    f"<li>{html.escape(w['id'])} ({html.escape(w['source'])}): Dice {w['dice']:.4f}</li>"
    for w in aggregate["worst"]
  )
  return f"<ol>{items}</ol>"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; } .note { color: #666; font-size: 0.85em; }
"""


def _segmentation_section(segmentation: Mapping[str, Any], result: Any, path) -> list[str]:
  if not segmentation["num_images_with_mask"]:
    return []
  notes = "".join(
    f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in segmentation["notes"].items()
  )
  parts = [
    "<h2>Segmentation at native resolution</h2>",
    f"<p>{segmentation['num_images_with_mask']} images with a reference mask. "
    f"Primary variant (config.postprocess): <b>{segmentation['primary']}</b>.</p>",
    "<h3>Raw predictions</h3>",
    _aggregate_table(segmentation["raw"]),
    "<h3>Post-processed</h3>",
    _aggregate_table(segmentation["postprocessed"]),
    "<h3>Per source</h3>",
    _per_source_table(segmentation),
    f"<h3>The {len(segmentation['raw']['worst'])} worst images (raw Dice)</h3>",
    _worst_list(segmentation["raw"]),
    f"<ul class='note'>{notes}</ul>",
    "<h2>Best, median and worst cases</h2>",
    _save(figures.cases_figure(result.rows, result.cases), path("cases")),
    "<h2>Dice distribution</h2>",
    _save(figures.dice_figure(result.rows), path("dice")),
  ]
  quality = segmentation.get("quality")
  if quality:
    parts += [
      "<h2>Mask quality control</h2>",
      f"<p>{quality['num_flagged']} of {quality['num_images']} masks flagged (uncertainty &gt; "
      f"{quality['threshold']:g}): {html.escape(', '.join(quality['flagged']) or 'none')}. "
      f"AUROC of the uncertainty for masks with Dice &lt; {quality['poor_below']}: "
      f"{_fmt(quality['auroc'])} ({quality['num_poor']} such masks); of the flagged masks with "
      f"a reference, {quality['flagged_poor']} have Dice &lt; {quality['poor_below']}.</p>",
      _save(
        figures.quality_figure(result.rows, result.cases, quality["threshold"]), path("quality")
      ),
    ]
  with_attention = result.attention
  if with_attention:
    parts += [
      "<h2>Attention maps</h2>",
      _save(figures.attention_figure(with_attention), path("attention")),
    ]
  return parts


def _classification_section(stats: Mapping[str, Any], result: Any, path) -> list[str]:
  rows = [
    ("images (abnormal)", f"{stats['num_images']} ({stats['num_abnormal']})"),
    ("accuracy at 0.5", _fmt(stats["accuracy"])),
    (
      "AUC (95% bootstrap CI)",
      f"{_fmt(stats['auc'])} ({_fmt(stats['auc_ci95'][0])}&ndash;{_fmt(stats['auc_ci95'][1])})",
    ),
    (f"threshold (Youden's J on {html.escape(stats['threshold_from'])})", _fmt(stats["threshold"])),
    (
      "sensitivity / specificity at it",
      f"{_fmt(stats['sensitivity'])} / {_fmt(stats['specificity'])}",
    ),
    ("accuracy at it", _fmt(stats["accuracy_at_threshold"])),
    ("expected calibration error (10 bins)", _fmt(stats["ece"])),
    (
      "ECE after temperature scaling (T fitted on validation)",
      f"{_fmt(stats['calibration']['ece_after'])} (T = {stats['calibration']['temperature']:.2f})"
      if "calibration" in stats
      else "",
    ),
  ]
  rows += [
    (f"AUC {html.escape(s)} (n={v['num_images']})", _fmt(v["auc"]))
    for s, v in stats.get("per_source", {}).items()
  ]
  table = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
  return [
    "<h2>Classification</h2>",
    f"<table>{table}</table>",
    "<h3>ROC curve</h3>",
    _save(figures.roc_figure(result.labels, result.probs, stats), path("roc")),
    "<h3>Reliability diagram</h3>",
    _save(
      figures.reliability_figure(result.labels, result.probs, stats["ece"]), path("reliability")
    ),
  ]


def _structures_section(stats: Mapping[str, Any], result: Any, path) -> list[str]:
  head = "<tr><th>structure</th><th>images outlined</th><th>Dice</th><th>HD95 mm</th></tr>"
  body = "".join(
    f"<tr><td>{html.escape(name)}</td><td>{v['count']}</td><td>{_fmt(v['dice'])}</td>"
    f"<td>{_fmt(v['hd95_mm'], 2)}</td></tr>"
    for name, v in stats.items()
    if isinstance(v, Mapping) and name != "per_source"
  )
  ratio = (
    f"<p>cardiothoracic ratio (widest heart / widest thorax): mean absolute error "
    f"{_fmt(stats['cardiothoracic_ratio_mae'])} over {stats['cardiothoracic_ratio_count']} "
    "images outlining both</p>"
  )
  pictures = []
  if any(figures.is_finite_number(r.get("heart_dice")) and r.get("has_mask") for r in result.rows):
    figure = figures.structures_figure(result.rows, result.cases)
    pictures = ["<h3>Best, median and worst heart</h3>", _save(figure, path("structures"))]
  return [
    "<h2>Structures (native size)</h2>",
    f"<table>{head}{body}</table>",
    ratio,
    *pictures,
    *_per_source_rows(
      stats,
      lambda v: (
        " ".join(
          f"{html.escape(n)} Dice {_fmt(x['dice'])} (n={x['count']})"
          for n, x in v.items()
          if isinstance(x, Mapping) and n != "per_source"
        )
        + f", cardiothoracic ratio MAE {_fmt(v['cardiothoracic_ratio_mae'])}"
      ),
    ),
  ]


def _per_source_rows(stats: Mapping[str, Any], describe) -> list[str]:
  """A per-source table of a head's summary (only where the split holds several sources)."""
  per_source = stats.get("per_source", {})
  if len(per_source) < 2:
    return []
  rows = "".join(
    f"<tr><td>{html.escape(s)}</td><td>{describe(v)}</td></tr>" for s, v in per_source.items()
  )
  return ["<h3>Per source</h3>", f"<table>{rows}</table>"]


def _findings_section(stats: Mapping[str, Any], result: Any, path) -> list[str]:
  head = "<tr><th>finding</th><th>AUC (95% bootstrap CI)</th><th>positive / labelled</th></tr>"
  body = "".join(
    f"<tr><td>{html.escape(name)}</td><td>{_fmt(v['auc'])} ({_fmt(v['auc_ci'][0])}&ndash;"
    f"{_fmt(v['auc_ci'][1])})</td><td>{v['positives']} / {v['labelled']}</td></tr>"
    for name, v in stats["per_finding"].items()
  )
  return [
    "<h2>Findings</h2>",
    f"<p>macro AUC {_fmt(stats['macro_auc'])}</p>",
    f"<table>{head}{body}</table>",
    *_per_source_rows(stats, lambda v: f"macro AUC {_fmt(v['macro_auc'])}"),
    "<h3>ROC per finding</h3>",
    _save(figures.finding_roc_figure(result.rows, stats), path("finding_roc")),
  ]


# Each head's task (`heads.Head.task`) -> its section of the report.
_SECTIONS = {
  "segmentation": _segmentation_section,
  "classification": _classification_section,
  "structures": _structures_section,
  "findings": _findings_section,
}


def write_report(out_dir: str, split: str, summary: Mapping[str, Any], result: Any) -> str:
  """Writes `<split>_report.html` and its PNG figures into `out_dir`; returns the HTML path.

  `result` is an `evaluation.SplitResult` (rows, cases, labels, probs).
  """

  def path(name):
    return f"{out_dir}/{split}_{name}.png"

  title = f"cxr_jax evaluation: {summary['model']} on {summary['dataset']} / {split}"
  parts = [
    f"<h1>{html.escape(title)}</h1>",
    f"<p class='note'>workdir {html.escape(str(summary['workdir']))}, "
    f"{summary['checkpoint']} checkpoint (step {summary['step']}), "
    f"{summary['num_images']} images, model input {summary['image_size']} px, "
    f"written {summary['created']}</p>",
  ]
  for head in heads.HEADS:
    if head.task in summary and head.task in _SECTIONS:
      parts += _SECTIONS[head.task](summary[head.task], result, path)
  document = (
    f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
    f"</title><style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>"
  )
  html_path = f"{out_dir}/{split}_report.html"
  epath.Path(html_path).write_text(document)
  return html_path
