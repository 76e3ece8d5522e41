"""The README's real-data tables from cross-validation run directories (not run by CI).

    python benchmarks/recipe_effects.py --seg=runs/semi/supervised \
        --semi=runs/semi/mean_teacher --cls=runs/classify/multitask

Reads each run's eval/test.csv (and eval/test.tta_off.csv, written by `python -m
cxr_jax.evaluate --workdir=RUN --checkpoint=best --tta=off`), metrics.jsonl and sweep.json,
and prints markdown: the segmentation recipe per fold and pooled over every test image, the
paired effects of TTA, post-processing and the EMA, the mean teacher against the supervised
runs of the same folds, quality control (AUROC of the uncertainty for Dice < 0.95, and a
threshold chosen on folds 0-1 applied to the others), and the classifier per fold and pooled
with its calibration. Intervals: 95%, percentile bootstrap over images (pooled and paired
rows) or t over folds.
"""

import argparse
import csv
import glob
import json
import math
import os

import numpy as np

from cxr_jax.core.stats import classification_stats
from cxr_jax.core.stats import paired_stats
from cxr_jax.workflows import split_summaries

POOR = split_summaries.POOR_DICE


def read_csv(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return list(csv.DictReader(f))


def runs_by_fold(root: str) -> dict[int, str]:
  out = {}
  for run in sorted(glob.glob(os.path.join(root, "*"))):
    record = os.path.join(run, "sweep.json")
    if os.path.exists(record) and os.path.exists(os.path.join(run, "eval", "test.csv")):
      out[int(json.load(open(record))["fold"])] = run
  return out


def masked(rows: list[dict]) -> list[dict]:
  return [r for r in rows if r["has_mask"] == "1" and r["dice"] != ""]


def bootstrap_mean(values, seed: int = 0) -> tuple[float, float, float]:
  values = np.asarray(values, np.float64)
  means = values[np.random.default_rng(seed).integers(0, len(values), (2000, len(values)))]
  lo, hi = np.quantile(means.mean(axis=1), [0.025, 0.975])
  return float(values.mean()), float(lo), float(hi)


def fmt(triple, digits: int = 4, sign: str = "") -> str:
  mean, lo, hi = triple
  return f"{mean:{sign}.{digits}f} [{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]"


def validation_at_best(run: str) -> tuple[float, float]:
  """(EMA, online) validation Dice at the step evaluate scored."""
  step = json.load(open(os.path.join(run, "eval", "test.json")))["step"]
  for line in open(os.path.join(run, "metrics.jsonl")):
    row = json.loads(line)
    if row["split"] == "validation" and row["step"] == step and "online_dice" in row:
      return row["dice"], row["online_dice"]
  return math.nan, math.nan


def segmentation(seg_root: str) -> dict[int, list[dict]]:
  folds = runs_by_fold(seg_root)
  rows_by_fold = {
    f: masked(read_csv(os.path.join(r, "eval", "test.csv"))) for f, r in folds.items()
  }
  print("### Segmentation recipe, 5-fold (test folds, native resolution)\n")
  print(
    "| fold | images | Dice | Montgomery | Shenzhen | HD95 px | ASD px | QC AUROC | val Dice EMA / online |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for fold, rows in rows_by_fold.items():

    def d(src, rows=rows):
      return np.mean([float(r["dice"]) for r in rows if src in (None, r["source"])])

    auroc = classification_stats.roc_auc(
      scores=np.array([float(r["uncertainty"]) for r in rows]),
      labels=np.array([float(r["dice"]) < POOR for r in rows]),
    )
    ema, online = validation_at_best(folds[fold])
    print(
      f"| {fold} | {len(rows)} | {d(None):.4f} | {d('montgomery'):.4f} | {d('shenzhen'):.4f} | "
      f"{np.mean([float(r['hd95_px']) for r in rows]):.2f} | "
      f"{np.mean([float(r['asd_px']) for r in rows]):.2f} | {auroc:.3f} | {ema:.4f} / {online:.4f} |"
    )
  pooled = [r for rows in rows_by_fold.values() for r in rows]
  fold_means = [np.mean([float(r["dice"]) for r in rows]) for rows in rows_by_fold.values()]
  print(
    f"\nPooled over {len(pooled)} images: Dice "
    + fmt(bootstrap_mean([float(r["dice"]) for r in pooled])),
    end="",
  )
  for src in ("montgomery", "shenzhen"):
    own = [float(r["dice"]) for r in pooled if r["source"] == src]
    print(f"; {src} ({len(own)}) " + fmt(bootstrap_mean(own)), end="")
  lo, hi = paired_stats.t_interval(fold_means)
  print(
    f"; mean of fold means {np.mean(fold_means):.4f} +- {np.std(fold_means, ddof=1):.4f} "
    f"[{lo:.4f}, {hi:.4f}] (t, folds). Median {np.median([float(r['dice']) for r in pooled]):.4f}, "
    f"worst {min(float(r['dice']) for r in pooled):.4f}.\n"
  )
  # Paired effects on the same images.
  print("| change (paired, same images) | Dice difference [95% CI] | images |\n|---|---|---|")
  tta_pairs = []
  for fold, run in folds.items():
    off = {r["id"]: r for r in masked(read_csv(os.path.join(run, "eval", "test.tta_off.csv")))}
    tta_pairs += [
      (float(r["dice"]), float(off[r["id"]]["dice"])) for r in rows_by_fold[fold] if r["id"] in off
    ]
  if tta_pairs:
    a, b = np.array(tta_pairs).T
    print(
      f"| TTA (7 views) vs none | {fmt(paired_stats.paired_mean_difference(a, b), sign='+')} | {len(a)} |"
    )
  a = np.array([float(r["dice_post"]) for r in pooled])
  b = np.array([float(r["dice"]) for r in pooled])
  print(
    f"| post-processing vs raw | {fmt(paired_stats.paired_mean_difference(a, b), sign='+')} | {len(a)} |"
  )
  emas = np.array([validation_at_best(run) for run in folds.values()])
  diff = emas[:, 0] - emas[:, 1]
  lo, hi = paired_stats.t_interval(diff)
  print(
    f"| EMA vs trained weights (validation, t over folds) | {diff.mean():+.4f} [{lo:+.4f}, {hi:+.4f}] | {len(diff)} folds |\n"
  )
  # Quality control: threshold by Youden's J on folds 0-1, applied to the rest.
  u = np.array([float(r["uncertainty"]) for r in pooled])
  poor = np.array([float(r["dice"]) < POOR for r in pooled])
  auroc = classification_stats.roc_auc(scores=u, labels=poor)
  lo, hi = classification_stats.bootstrap_auc_interval(poor, u, seed=0)
  choose = [r for f in (0, 1) if f in rows_by_fold for r in rows_by_fold[f]]
  rest = [r for f in rows_by_fold if f not in (0, 1) for r in rows_by_fold[f]]
  threshold = classification_stats.youden_threshold(
    np.array([float(r["dice"]) < POOR for r in choose]),
    np.array([float(r["uncertainty"]) for r in choose]),
  )
  print(
    f"QC: {int(poor.sum())} of {len(pooled)} masks have Dice < {POOR}; AUROC of the uncertainty {auroc:.3f} [{lo:.3f}, {hi:.3f}]."
  )
  if rest:
    flagged = [r for r in rest if float(r["uncertainty"]) > threshold]
    bad = [r for r in rest if float(r["dice"]) < POOR]
    hit = [r for r in flagged if float(r["dice"]) < POOR]
    print(
      f"Threshold {threshold:.3f} (Youden's J on folds 0-1) on folds 2-4: {len(flagged)} of "
      f"{len(rest)} flagged, {len(hit)} of them poor; {len(hit)} of {len(bad)} poor masks found.\n"
    )
  return rows_by_fold


def semi(seg_root: str, semi_root: str) -> None:
  base, new = runs_by_fold(seg_root), runs_by_fold(semi_root)
  shared = sorted(set(base) & set(new))
  if not shared:
    return
  pairs = []
  for fold in shared:
    b = {r["id"]: r for r in masked(read_csv(os.path.join(base[fold], "eval", "test.csv")))}
    for r in masked(read_csv(os.path.join(new[fold], "eval", "test.csv"))):
      if r["id"] in b:
        pairs.append((float(r["dice"]), float(b[r["id"]]["dice"]), r["source"]))
  print(f"### Mean teacher vs supervised, folds {shared}\n")
  print("| images | mean teacher | supervised | paired difference [95% CI] |\n|---|---|---|---|")
  for src in (None, "montgomery", "shenzhen"):
    own = [(a, b) for a, b, s in pairs if src in (None, s)]
    a, b = np.array(own).T
    diff = fmt(paired_stats.paired_mean_difference(a, b), sign="+")
    print(f"| {src or 'all'} ({len(own)}) | {a.mean():.4f} | {b.mean():.4f} | {diff} |")
  print()


def classification(cls_root: str) -> None:
  folds = runs_by_fold(cls_root)
  if not folds:
    return
  print("### Normal vs abnormal, 5-fold (test folds)\n")
  print("| fold | images | AUC [95% CI] | ECE | ECE calibrated (T) |\n|---|---|---|---|---|")
  labels, probs, calibrated, aucs = [], [], [], []
  for fold, run in folds.items():
    summary = json.load(open(os.path.join(run, "eval", "test.json")))["classification"]
    rows = read_csv(os.path.join(run, "eval", "test.csv"))
    labels += [int(r["label"]) for r in rows]
    probs += [float(r["p_abnormal"]) for r in rows]
    calibrated += [float(r.get("p_abnormal_calibrated") or "nan") for r in rows]
    cal = summary.get("calibration", {})
    aucs.append(summary["auc"])
    print(
      f"| {fold} | {summary['num_images']} | {summary['auc']:.3f} [{summary['auc_ci95'][0]:.3f}, "
      f"{summary['auc_ci95'][1]:.3f}] | {summary['ece']:.3f} | "
      f"{cal.get('ece_after', math.nan):.3f} ({cal.get('temperature', math.nan):.2f}) |"
    )
  labels, probs, calibrated = np.array(labels), np.array(probs), np.array(calibrated)
  lo, hi = paired_stats.t_interval(aucs)
  pooled_lo, pooled_hi = classification_stats.bootstrap_auc_interval(
    labels.astype(bool), probs, seed=0
  )
  print(
    f"\nMean of fold AUCs {np.mean(aucs):.3f} [{lo:.3f}, {hi:.3f}] (t, folds); pooled "
    f"out-of-fold AUC {classification_stats.roc_auc(scores=probs, labels=labels):.3f} "
    f"[{pooled_lo:.3f}, {pooled_hi:.3f}] over {len(labels)} images; pooled ECE "
    f"{classification_stats.expected_calibration_error(labels, probs):.3f} before, "
    f"{classification_stats.expected_calibration_error(labels, calibrated):.3f} after "
    "temperature scaling (each fold's T fitted on its validation fold).\n"
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seg", default="runs/semi/supervised")
  parser.add_argument("--semi", default="runs/semi/mean_teacher")
  parser.add_argument("--cls", default="runs/classify/multitask")
  args = parser.parse_args()
  if runs_by_fold(args.seg):
    segmentation(args.seg)
    semi(args.seg, args.semi)
  classification(args.cls)


if __name__ == "__main__":
  main()
