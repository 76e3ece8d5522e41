"""The evaluation report: one self-contained HTML file and the same figures as PNG files.

`write_report(out_dir, split, summary, result)` writes `<split>_report.html` (every image
inline) and beside it `<split>_cases.png`, `<split>_dice.png`, `<split>_attention.png`
(segmenters) and `<split>_roc.png`, `<split>_reliability.png` (classifiers). matplotlib with
the Agg backend: no display needed.
"""

import base64
import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display needed; chosen before pyplot is imported
import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colors
from matplotlib import lines
from matplotlib import patches
from matplotlib import ticker

from cxr_jax.core import classification_stats
from cxr_jax.core import heads
from cxr_jax.core import overlays
from cxr_jax.data import registry

TRUTH_COLOUR = np.array(overlays.TRUE_RGB) / 255  # green: the reference outline
PRED_COLOUR = np.array(overlays.PRED_RGB) / 255  # red: the prediction
DPI = 110


# ----- figures -----


def _show_case(ax: plt.Axes, case: Any, pred: np.ndarray, title: str) -> None:
  """The shared overlay drawing: prediction tinted and outlined in red, truth outlined green."""
  ax.imshow(overlays.overlay(case.image, pred, case.truth), interpolation="lanczos")
  ax.set_title(title, fontsize=9)
  ax.set_axis_off()


def select_cases(
  rows: Sequence[Mapping[str, Any]], metric: str = "dice"
) -> list[tuple[str, Mapping[str, Any]]]:
  """(role, row) for the best, median and worst image by `metric` (images with a mask)."""
  scored = sorted(
    (r for r in rows if r.get("has_mask") and _is_finite_number(r.get(metric))),
    key=lambda r: (-float(r[metric]), str(r["id"])),
  )
  if not scored:
    return []
  picks = [("best", scored[0]), ("median", scored[len(scored) // 2]), ("worst", scored[-1])]
  return picks[: len(scored)] if len(scored) < 3 else picks


def cases_figure(rows: Sequence[Mapping[str, Any]], cases: Mapping[str, Any]) -> plt.Figure:
  """Best / median / worst by Dice; top row raw, bottom row post-processed."""
  picks = select_cases(rows)
  # Panel height from the tallest image's aspect ratio: no empty bands around landscape ones.
  aspect = max(cases[r["id"]].image.shape[0] / cases[r["id"]].image.shape[1] for _, r in picks)
  panel_w = 3.8
  fig, axes = plt.subplots(
    2, len(picks), squeeze=False, figsize=(panel_w * len(picks), 2 * (panel_w * aspect + 0.6) + 0.4)
  )
  for col, (role, row) in enumerate(picks):
    case = cases[row["id"]]
    for r, (variant, pred, suffix) in enumerate(
      (("raw", case.pred, ""), ("post-processed", case.pred_post, "_post"))
    ):
      title = (
        f"{role}: {row['id']} ({row['source']})\n{variant}: Dice "
        f"{row['dice' + suffix]:.3f}, HD95 {row['hd95_px' + suffix]:.1f} px"
      )
      _show_case(axes[r, col], case, pred, title)
  handles = [
    lines.Line2D([], [], color=TRUTH_COLOUR, lw=2, label="reference outline"),
    patches.Patch(
      facecolor=colors.to_rgba(PRED_COLOUR, 0.4), edgecolor=PRED_COLOUR, label="prediction"
    ),
  ]
  fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False)
  fig.tight_layout(rect=(0, 0.04, 1, 1))
  return fig


def dice_figure(rows: Sequence[Mapping[str, Any]]) -> plt.Figure:
  """Histogram of per-image Dice per source; raw and post-processed side by side."""
  masked = [r for r in rows if r.get("has_mask")]
  values = [
    float(r[k]) for r in masked for k in ("dice", "dice_post") if _is_finite_number(r.get(k))
  ]
  lo = min(0.9, math.floor(min(values, default=0.0) * 20) / 20)
  bins = np.linspace(lo, 1.0, 31)
  fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4), sharey=True)
  present = {r["source"] for r in masked}
  colours = registry.source_colours()
  sources = [s for s in colours if s in present] + sorted(present - set(colours))
  for ax, key, title in zip(axes, ("dice", "dice_post"), ("raw", "post-processed")):
    data = [[np.clip(float(r[key]), lo, 1.0) for r in masked if r["source"] == s] for s in sources]
    ax.hist(
      data,
      bins=bins,
      stacked=True,
      label=[f"{s} (n={len(d)})" for s, d in zip(sources, data)],
      color=[colours.get(s, "#444444") for s in sources],
      edgecolor="white",
      linewidth=0.4,
    )
    everything = np.concatenate([np.asarray(d, float) for d in data]) if data else np.zeros(0)
    if everything.size:
      ax.axvline(
        np.median(everything),
        color="black",
        lw=1,
        ls="--",
        label=f"median {np.median(everything):.3f}",
      )
    ax.set_title(f"Dice per image, {title}", fontsize=10)
    clipped = lo > 0 and any(v < lo for v in values)
    ax.set_xlabel("Dice" + (f" (values below {lo:.2f} drawn at {lo:.2f})" if clipped else ""))
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("images")
  fig.tight_layout()
  return fig


def roc_figure(
  labels: np.ndarray, probs: np.ndarray, classification: Mapping[str, Any]
) -> plt.Figure:
  """ROC curve with the AUC, its bootstrap interval and the validation-chosen threshold."""
  curve = classification_stats.roc_curve(labels, probs)
  fig, ax = plt.subplots(figsize=(4.6, 4.4))
  lo, hi = classification["auc_ci95"]
  ax.plot(
    curve["fpr"],
    curve["tpr"],
    color="#1f77b4",
    lw=2,
    drawstyle="steps-post",
    label=f"AUC {classification['auc']:.3f} (95% CI {lo:.3f}-{hi:.3f})",
  )
  ax.plot([0, 1], [0, 1], color="grey", lw=1, ls=":", label="chance")
  sens, spec = classification["sensitivity"], classification["specificity"]
  if _is_finite_number(sens) and _is_finite_number(spec):
    ax.plot(
      1 - spec,
      sens,
      "o",
      color="#d62728",
      label=f"threshold {classification['threshold']:.3f}\n(sens {sens:.2f}, spec {spec:.2f})",
    )
  ax.set(
    xlabel="1 - specificity (false positive rate)",
    ylabel="sensitivity (true positive rate)",
    xlim=(-0.02, 1.02),
    ylim=(-0.02, 1.02),
    aspect="equal",
  )
  ax.set_title(f"ROC, {classification['num_images']} images", fontsize=10)
  ax.legend(fontsize=8, loc="lower right")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return fig


def reliability_figure(labels: np.ndarray, probs: np.ndarray, ece: float) -> plt.Figure:
  """Observed fraction abnormal vs mean predicted p(abnormal) per bin, with bin counts."""
  bins = classification_stats.reliability_bins(labels, probs)
  fig, (ax, ax_count) = plt.subplots(
    2, 1, figsize=(4.6, 5.2), sharex=True, gridspec_kw={"height_ratios": (3, 1)}
  )
  centres = (bins["lower"] + bins["upper"]) / 2
  width = bins["upper"][0] - bins["lower"][0]
  used = bins["count"] > 0
  ax.bar(
    centres[used],
    bins["accuracy"][used],
    width=width * 0.9,
    color="#1f77b4",
    alpha=0.8,
    label="observed fraction abnormal",
  )
  ax.plot(
    bins["confidence"][used],
    bins["accuracy"][used],
    "o",
    color="#d62728",
    ms=4,
    label="at the bin's mean p",
  )
  ax.plot([0, 1], [0, 1], color="grey", ls=":", label="perfect calibration")
  ax.set(ylabel="fraction abnormal", xlim=(0, 1), ylim=(0, 1.02))
  ax.set_title(f"Reliability (10 bins), ECE {ece:.3f}", fontsize=10, pad=34)
  ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
  ax.grid(alpha=0.3)
  ax_count.bar(centres, bins["count"], width=width * 0.9, color="#7f7f7f")
  ax_count.set(xlabel="predicted p(abnormal)", ylabel="images")
  ax_count.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax_count.grid(alpha=0.3)
  fig.tight_layout()
  return fig


def attention_figure(cases: Sequence[Any]) -> plt.Figure:
  """Each case's model input, then each attention gate map (finest first) laid over it."""
  levels = max(len(c.attention) for c in cases)
  fig, axes = plt.subplots(
    len(cases), levels + 1, squeeze=False, figsize=(2.3 * (levels + 1), 2.4 * len(cases) + 0.5)
  )
  for r, case in enumerate(cases):
    background = case.model_input if case.model_input is not None else case.image
    size = background.shape[0]
    axes[r, 0].imshow(background, cmap="gray")
    axes[r, 0].set_title(f"{case.id}", fontsize=8)
    for c, gate in enumerate(case.attention):
      ax = axes[r, c + 1]
      ax.imshow(background, cmap="gray")
      shown = ax.imshow(
        gate,
        cmap="magma",
        vmin=0,
        vmax=1,
        alpha=0.65,
        interpolation="bilinear",
        extent=(-0.5, size - 0.5, size - 0.5, -0.5),
      )
      ax.set_title(f"gate {c} ({gate.shape[0]}x{gate.shape[1]})", fontsize=8)
    for ax in axes[r]:
      ax.set_axis_off()
  fig.suptitle("Attention gates on the model's letterboxed input (1: skip passed)", fontsize=9)
  fig.tight_layout(rect=(0, 0, 0.92, 1))
  fig.colorbar(shown, cax=fig.add_axes((0.93, 0.15, 0.015, 0.7)))
  return fig


# ----- HTML -----


def _is_finite_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.floating)) and math.isfinite(float(value))


def _fmt(value: Any, digits: int = 4) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "&ndash;"
  if isinstance(value, (float, np.floating)):
    return f"{value:.{digits}f}"
  return html.escape(str(value))


def _save(fig: plt.Figure, path: str) -> str:
  """Saves the figure as PNG at `path` and returns it as a base64 <img> tag."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=DPI)
  plt.close(fig)
  data = buffer.getvalue()
  with open(path, "wb") as f:
    f.write(data)
  alt = html.escape(os.path.basename(path))
  return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


_METRIC_TITLES = {
  "dice": "Dice",
  "iou": "IoU",
  "precision": "precision",
  "recall": "recall",
  "hd95_px": "HD95 px",
  "asd_px": "ASSD px",
  "hd95_mm": "HD95 mm",
  "asd_mm": "ASSD mm",
}


def _aggregate_table(aggregate: Mapping[str, Any]) -> str:
  head = "".join(f"<th>{t}</th>" for t in ("metric", "mean", "median", "std", "min", "max", "n"))
  body = []
  for metric, title in _METRIC_TITLES.items():
    stats = aggregate["all"][metric]
    body.append(
      f"<tr><td>{title}</td>"
      + "".join(
        f"<td>{_fmt(stats[k], 2 if 'px' in metric or 'mm' in metric else 4)}</td>"
        for k in ("mean", "median", "std", "min", "max")
      )
      + f"<td>{stats['count']}</td></tr>"
    )
  return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _per_source_table(segmentation: Mapping[str, Any]) -> str:
  metrics = ("dice", "iou", "precision", "recall", "hd95_px", "asd_px", "hd95_mm", "asd_mm")
  head = (
    "<tr><th>source</th><th>variant</th><th>n</th>"
    + "".join(f"<th>{_METRIC_TITLES[m]} (mean &plusmn; std)</th>" for m in metrics)
    + "</tr>"
  )
  body = []
  for source in segmentation["raw"]["per_source"]:
    for variant in ("raw", "postprocessed"):
      stats = segmentation[variant]["per_source"][source]
      cells = []
      for m in metrics:
        digits = 2 if ("px" in m or "mm" in m) else 4
        cells.append(
          f"<td>{_fmt(stats[m]['mean'], digits)} &plusmn; {_fmt(stats[m]['std'], digits)}</td>"
          if _is_finite_number(stats[m]["mean"])
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
    _save(cases_figure(result.rows, result.cases), path("cases")),
    "<h2>Dice distribution</h2>",
    _save(dice_figure(result.rows), path("dice")),
  ]
  with_attention = [c for c in result.cases.values() if c.attention]
  if with_attention:
    parts += ["<h2>Attention maps</h2>", _save(attention_figure(with_attention), path("attention"))]
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
    _save(roc_figure(result.labels, result.probs, stats), path("roc")),
    "<h3>Reliability diagram</h3>",
    _save(reliability_figure(result.labels, result.probs, stats["ece"]), path("reliability")),
  ]


# Each head's task (`heads.Head.task`) -> its section of the report.
_SECTIONS = {"segmentation": _segmentation_section, "classification": _classification_section}


def write_report(out_dir: str, split: str, summary: Mapping[str, Any], result: Any) -> str:
  """Writes `<split>_report.html` and its PNG figures into `out_dir`; returns the HTML path.

  `result` is an `evaluation.SplitResult` (rows, cases, labels, probs).
  """

  def path(name):
    return os.path.join(out_dir, f"{split}_{name}.png")

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
  html_path = os.path.join(out_dir, f"{split}_report.html")
  with open(html_path, "w") as f:
    f.write(document)
  return html_path
