"""The evaluation figures (matplotlib, Agg backend: no display needed)."""

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # chosen before pyplot is imported
import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colors
from matplotlib import lines
from matplotlib import patches
from matplotlib import ticker

from cxr_jax.core.inference import overlays
from cxr_jax.core.stats import classification_stats
from cxr_jax.data import registry

TRUTH_COLOUR = np.array(overlays.TRUE_RGB) / 255  # green: the reference outline
PRED_COLOUR = np.array(overlays.PRED_RGB) / 255  # red: the prediction
DPI = 110


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
    (r for r in rows if r.get("has_mask") and is_finite_number(r.get(metric))),
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


def quality_figure(
  rows: Sequence[Mapping[str, Any]], cases: Mapping[str, Any], threshold: float, num: int = 4
) -> plt.Figure:
  """Mask quality control: uncertainty against Dice (images with a reference mask) with the
  flagging threshold, then the `num` most uncertain masks."""
  scored = [r for r in rows if is_finite_number(r.get("uncertainty"))]
  picks = sorted(scored, key=lambda r: -float(r["uncertainty"]))[:num]
  fig, axes = plt.subplots(1, 1 + len(picks), squeeze=False, figsize=(3.8 * (1 + len(picks)), 5.0))
  ax = axes[0, 0]
  masked = [r for r in scored if r.get("has_mask") and is_finite_number(r.get("dice"))]
  colours = registry.source_colours()
  for source in sorted({r["source"] for r in masked}):
    own = [r for r in masked if r["source"] == source]
    ax.scatter(
      [float(r["uncertainty"]) for r in own],
      [float(r["dice"]) for r in own],
      s=10,
      alpha=0.7,
      color=colours.get(source),
      label=source,
    )
  ax.axvline(threshold, color="k", ls="--", lw=1, label=f"flagged > {threshold:g}")
  ax.axhline(0.95, color="grey", ls=":", lw=1, label="Dice 0.95")
  ax.set_xlabel("uncertainty (boundary entropy per lung pixel)")
  ax.set_ylabel("Dice (raw)")
  ax.legend(fontsize=7, frameon=False)
  for col, row in enumerate(picks, start=1):
    case = cases[row["id"]]
    dice = f", Dice {float(row['dice']):.3f}" if is_finite_number(row.get("dice")) else ""
    title = f"{row['id']} ({row['source']})\nuncertainty {float(row['uncertainty']):.3f}{dice}"
    _show_case(axes[0, col], case, case.pred, title)
  fig.tight_layout()
  return fig


def dice_figure(rows: Sequence[Mapping[str, Any]]) -> plt.Figure:
  """Histogram of per-image Dice per source; raw and post-processed side by side."""
  masked = [r for r in rows if r.get("has_mask")]
  values = [
    float(r[k]) for r in masked for k in ("dice", "dice_post") if is_finite_number(r.get(k))
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
  if is_finite_number(sens) and is_finite_number(spec):
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


def png_bytes(fig: plt.Figure) -> bytes:
  """The figure as PNG (at DPI), closed afterwards."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=DPI)
  plt.close(fig)
  return buffer.getvalue()


def is_finite_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.floating)) and math.isfinite(float(value))


def strip_figure(runs: Sequence[Mapping[str, Any]], metric: str) -> plt.Figure:
  """One dot per run (seed, fold) of `metric` for each variant, and the variant's mean."""
  variants = sorted({r["row"]["variant"] for r in runs})
  fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(variants), 3.4))
  rng = np.random.default_rng(0)
  for k, variant in enumerate(variants):
    values = [
      r["row"][metric]
      for r in runs
      if r["row"]["variant"] == variant and is_finite_number(r["row"].get(metric))
    ]
    ax.scatter(k + rng.uniform(-0.12, 0.12, len(values)), values, s=18, color="#1f77b4", alpha=0.8)
    if values:
      ax.hlines(np.mean(values), k - 0.25, k + 0.25, color="black", lw=2)
  ax.set_xticks(range(len(variants)), variants, rotation=20, ha="right", fontsize=8)
  ax.set_ylabel(metric)
  ax.set_title(f"{metric}: one dot per run, bar at the mean", fontsize=9)
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  return fig


def finding_roc_figure(
  rows: Sequence[Mapping[str, Any]], findings: Mapping[str, Any]
) -> plt.Figure:
  """One ROC curve per finding (evaluate's `p_<finding>` / `y_<finding>` columns) in a grid,
  each titled with its AUC."""
  names = list(findings["per_finding"])
  cols = min(4, len(names))
  grid_rows = -(-len(names) // cols)
  fig, axes = plt.subplots(grid_rows, cols, figsize=(2.6 * cols, 2.5 * grid_rows), squeeze=False)
  for ax, name in zip(axes.flat, names, strict=False):
    labelled = [r for r in rows if r.get(f"y_{name}", "") != ""]
    y = np.array([float(r[f"y_{name}"]) > 0.5 for r in labelled], bool)
    p = np.array([float(r[f"p_{name}"]) for r in labelled])
    if y.any() and not y.all():
      curve = classification_stats.roc_curve(y, p)
      ax.plot(curve["fpr"], curve["tpr"], color="#1f77b4", lw=1.5, drawstyle="steps-post")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    auc = findings["per_finding"][name]["auc"]
    ax.set_title(f"{name}: {auc:.3f}" if is_finite_number(auc) else f"{name}: n/a", fontsize=8)
    ax.set(xlim=(0, 1), ylim=(0, 1.02))
    ax.tick_params(labelsize=6)
  for ax in list(axes.flat)[len(names) :]:
    ax.axis("off")
  fig.tight_layout()
  return fig


STRUCTURE_COLOURS = {"lungs": "#1f77b4", "heart": "#d62728", "clavicles": "#2ca02c"}


def structures_figure(rows: Sequence[Mapping[str, Any]], cases: Mapping[str, Any]) -> plt.Figure:
  """Best / median / worst by heart Dice: each structure in its colour, the prediction
  tinted, the reference outlined (a model with model.structures)."""
  picks = select_cases(rows, "heart_dice")
  width = max(3.8 * len(picks), 6.0)  # room for the legend under one panel
  fig, axes = plt.subplots(1, max(len(picks), 1), squeeze=False, figsize=(width, 4.6))
  for col, (role, row) in enumerate(picks):
    case, ax = cases[row["id"]], axes[0, col]
    ax.imshow(case.image, cmap="gray", interpolation="lanczos")
    for name, (pred, truth) in (case.structures or {}).items():
      colour = colors.to_rgba(STRUCTURE_COLOURS.get(name, "#ff7f0e"))
      if pred is not None:
        tint = np.zeros((*pred.shape, 4))
        tint[pred] = (*colour[:3], 0.35)
        ax.imshow(tint, interpolation="nearest")
      if truth is not None and truth.any():
        ax.contour(truth, levels=[0.5], colors=[colour], linewidths=1.2)
    ax.set_title(f"{role}: {row['id']}\nheart Dice {float(row['heart_dice']):.3f}", fontsize=9)
    ax.set_axis_off()
  handles = [patches.Patch(color=c, label=n) for n, c in STRUCTURE_COLOURS.items()]
  handles.append(lines.Line2D([], [], color="k", lw=1.2, label="reference outline"))
  fig.legend(handles=handles, loc="lower center", ncol=4, frameon=False)
  fig.tight_layout(rect=(0, 0.08, 1, 1))
  return fig
