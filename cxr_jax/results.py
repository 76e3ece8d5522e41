"""`python -m cxr_jax.results DIR... [--output=OUT] [--baseline=VARIANT] [--split=test]`

Gathers run directories (config.json, eval/<split>.json and .csv, and sweep.json where a
sweep made them) into OUT/results.csv (a row per run), OUT/results.md and OUT/results.html:
per variant the mean and standard deviation over seeds and folds with a 95% t-interval, and
the paired difference to the baseline variant over the same images (per-image Dice: paired
bootstrap; AUC: paired bootstrap within each seed and fold), with a strip plot per metric.
"""

import base64
import collections
import csv
import html
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app
from absl import flags

from cxr_jax import cli
from cxr_jax import figures
from cxr_jax.core.run import csv_tables
from cxr_jax.core.run import rundir
from cxr_jax.core.stats import paired_stats

_ID_FIELDS = ("run", "variant", "seed", "fold", "step", "num_images")
METRICS = (
  "dice",
  "dice_montgomery",
  "dice_shenzhen",
  "hd95_px",
  "asd_px",
  "qc_auroc",
  "auc",
  "accuracy",
  "ece",
  "ece_calibrated",
  "val_dice",
  "val_online_dice",
)
# group: the dataset and task a run is compared within (runs of another dataset or task get
# their own table and baseline); finished: trained to its config.num_train_steps (unfinished
# runs are listed, not averaged).
RUN_FIELDS = (*_ID_FIELDS, *METRICS, "group", "finished")
# qc_auroc: how well the masks' uncertainty finds those with Dice < 0.95 (evaluation.POOR_DICE);
# ece_calibrated: after the temperature fitted on validation. val_dice, val_online_dice: the
# validation Dice (model resolution) at the evaluated step, of the EMA weights and of the
# trained weights themselves (runs with config.optim.ema_decay): the EMA's paired effect.


def read_run(workdir: str, split: str) -> dict[str, Any] | None:
  """One run's row and per-image values; None when it has no evaluation of `split`."""
  summary_path = os.path.join(workdir, "eval", f"{split}.json")
  if not os.path.exists(summary_path):
    return None
  try:
    with open(summary_path) as f:
      summary = json.load(f)
    group, num_train_steps = _group(workdir, summary)
    trained_to = _trained_to(workdir, summary)
  except (ValueError, KeyError, TypeError, AttributeError) as e:  # cut short, or edited
    print(
      f"results: skipping {workdir}: {' '.join(str(e).split())[:200]} (in {summary_path} "
      "or its config.json; evaluate the run again)",
      file=sys.stderr,
    )
    return None
  record_path = os.path.join(workdir, "sweep.json")
  if os.path.exists(record_path):
    with open(record_path) as f:
      record = json.load(f)
  else:
    record = {"variant": os.path.basename(os.path.normpath(workdir)), "seed": None, "fold": None}
  row = {
    "run": workdir,
    "variant": record["variant"],
    "seed": record["seed"],
    "fold": record["fold"],
    "step": summary.get("step"),
    "num_images": summary.get("num_images"),
    "group": group,
    "finished": trained_to >= (num_train_steps or 0),
  }
  if "segmentation" in summary:
    segmentation = summary["segmentation"]
    overall = segmentation["raw"]["all"]
    row.update({m: overall[m]["mean"] for m in ("dice", "hd95_px", "asd_px")})
    for source, values in segmentation["raw"].get("per_source", {}).items():
      if f"dice_{source}" in RUN_FIELDS:
        row[f"dice_{source}"] = values["dice"]["mean"]
    row["qc_auroc"] = (segmentation.get("quality") or {}).get("auroc")
  if "classification" in summary:
    classification = summary["classification"]
    row.update(auc=classification["auc"], accuracy=classification["accuracy"])
    row["ece"] = classification.get("ece")
    row["ece_calibrated"] = (classification.get("calibration") or {}).get("ece_after")
  row.update(_validation_at(workdir, summary.get("step")))
  with open(os.path.join(workdir, "eval", f"{split}.csv")) as f:
    images = {r["id"]: r for r in csv.DictReader(f)}
  return {"row": row, "images": images, "trained_to": trained_to, "steps": num_train_steps}


def _trained_to(workdir: str, summary: dict) -> int:
  """The newest checkpoint's step (the evaluated step where there are no checkpoints): a run
  evaluated at its best step may well have trained to the end."""
  checkpoints = os.path.join(workdir, "checkpoints")
  steps = (
    [int(n) for n in os.listdir(checkpoints) if n.isdigit()] if os.path.isdir(checkpoints) else []
  )
  return max(steps, default=summary.get("step") or 0)


def _group(workdir: str, summary: dict) -> tuple[str, int | None]:
  """(the dataset and task the run is compared within, its config.num_train_steps); the
  dataset is unknown ('') without config.json."""
  task = "+".join(t for t in ("segmentation", "classification") if t in summary) or "none"
  path = os.path.join(workdir, rundir.CONFIG_FILE)
  if not os.path.exists(path):
    return task, None
  record = rundir.read_record(path)
  data = record["config"].get("data", {})
  dataset = (record.get("dataset") or {}).get("name") or data.get("name", "")
  protocol = data.get("split", "hash")
  if protocol == "cross_site":
    protocol += f"[{data.get('train_sources', '')}]"
  return f"{dataset} {protocol} {task}", int(record["config"]["num_train_steps"])


def _validation_at(workdir: str, step: int | None) -> dict[str, float]:
  """val_dice / val_online_dice logged at `step` in DIR/metrics.jsonl ({} when absent)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if step is None or not os.path.exists(path):
    return {}
  with open(path) as f:
    lines = [json.loads(line) for line in f if line.strip()]
  for line in lines:
    if line.get("split") == "validation" and line.get("step") == step and "online_dice" in line:
      return {"val_dice": line["dice"], "val_online_dice": line["online_dice"]}
  return {}


def _float(text: str) -> float:
  return float(text) if text not in ("", None) else math.nan


def compare(runs: Sequence[dict], baseline: str) -> dict[str, dict[str, tuple]]:
  """{variant: {'dice' | 'auc': (difference, lo, hi, n)}} against `baseline`, paired by
  (seed, fold, image id)."""
  by_key = {(r["row"]["variant"], r["row"]["seed"], r["row"]["fold"]): r for r in runs}
  out = collections.defaultdict(dict)
  for variant in sorted({r["row"]["variant"] for r in runs} - {baseline}):
    dice_a, dice_b, groups = [], [], []
    for (name, seed, fold), run in by_key.items():
      base = by_key.get((baseline, seed, fold))
      if name != variant or base is None:
        continue
      shared = sorted(set(run["images"]) & set(base["images"]))
      for image in shared:
        a, b = _float(run["images"][image].get("dice")), _float(base["images"][image].get("dice"))
        if math.isfinite(a) and math.isfinite(b):
          dice_a.append(a)
          dice_b.append(b)
      scored = [
        i
        for i in shared
        if run["images"][i].get("p_abnormal") and base["images"][i].get("p_abnormal")
      ]
      if scored:
        groups.append(
          (
            np.array([int(run["images"][i]["label"]) for i in scored]),
            np.array([_float(run["images"][i]["p_abnormal"]) for i in scored]),
            np.array([_float(base["images"][i]["p_abnormal"]) for i in scored]),
          )
        )
    if dice_a:
      out[variant]["dice"] = (
        *paired_stats.paired_mean_difference(np.array(dice_a), np.array(dice_b)),
        len(dice_a),
      )
    if groups:
      out[variant]["auc"] = (
        *paired_stats.paired_auc_difference(groups),
        sum(len(g[0]) for g in groups),
      )
  return out


def _fmt(value: Any, digits: int = 4) -> str:
  return (
    "-"
    if value is None or (isinstance(value, float) and not math.isfinite(value))
    else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))
  )


def summary_table(runs: Sequence[dict], baseline: str) -> str:
  """The markdown table: per variant and metric, mean +- std [95% CI] (runs), and the
  paired difference to the baseline [95% CI] (images)."""
  variants = sorted({r["row"]["variant"] for r in runs}, key=lambda v: (v != baseline, v))
  present = [m for m in METRICS if any(r["row"].get(m) is not None for r in runs)]
  differences = compare(runs, baseline)
  lines = [
    "| variant | runs | " + " | ".join(present) + " | vs " + baseline + " (paired) |",
    "|---" * (len(present) + 3) + "|",
  ]
  for variant in variants:
    values = {
      m: [
        r["row"][m] for r in runs if r["row"]["variant"] == variant and r["row"].get(m) is not None
      ]
      for m in present
    }
    cells = []
    for m in present:
      v = np.asarray(values[m], np.float64)
      lo, hi = paired_stats.t_interval(v)
      std = v.std(ddof=1) if v.size > 1 else math.nan
      cells.append(
        f"{_fmt(float(v.mean()) if v.size else math.nan)} +- {_fmt(float(std))} "
        f"[{_fmt(lo)}, {_fmt(hi)}]"
      )
    diff = (
      "; ".join(
        f"{m} {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] (n={d[3]} images)"
        for m, d in differences.get(variant, {}).items()
      )
      or "baseline"
    )
    count = len([r for r in runs if r["row"]["variant"] == variant])
    lines.append(f"| {variant} | {count} | " + " | ".join(cells) + f" | {diff} |")
  return "\n".join(lines)


def write_results(
  out_dir: str, run_dirs: Sequence[str], *, baseline: str = "", split: str = "test"
) -> list[str]:
  """Writes results.csv, results.md and results.html into `out_dir`; returns their paths."""
  everything = [run for run in (read_run(d, split) for d in run_dirs) if run is not None]
  if not everything:
    raise FileNotFoundError(
      f"None of the {len(run_dirs)} run directories has a readable eval/{split}.json."
    )
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, f"results.{ext}") for ext in ("csv", "md", "html")]
  csv_tables.write_csv(paths[0], RUN_FIELDS, [r["row"] for r in everything])
  runs = [r for r in everything if r["row"]["finished"]]
  groups = sorted({r["row"]["group"] for r in runs})
  sections = []
  for group in groups:
    members = [r for r in runs if r["row"]["group"] == group]
    variants = [r["row"]["variant"] for r in members]
    base = baseline if baseline in variants else variants[0]
    heading = f"## {group}\n\n" if len(groups) > 1 else ""
    sections.append(
      f"{heading}(paired differences against {base})\n\n{summary_table(members, base)}"
    )
  unfinished = [
    f"- {r['row']['run']}: trained to step {r['trained_to']} of {r['steps']}"
    for r in everything
    if not r["row"]["finished"]
  ]
  table = "\n\n".join(sections)
  if unfinished:
    table += "\n\nUnfinished runs, left out of the table:\n" + "\n".join(unfinished)
  with open(paths[1], "w") as f:
    f.write(
      f"# Results on {split} ({len(runs)} runs)\n\nmean +- std [95% t-interval over "
      f"runs]; the last column: the paired difference to the baseline over the same "
      f"images [95% bootstrap interval]; runs of another dataset, protocol or task are "
      f"compared in their own table.\n\n{table}\n"
    )
  present = [m for m in ("dice", "auc") if any(r["row"].get(m) is not None for r in runs)]
  pictures = "".join(
    f'<img alt="{m}" src="data:image/png;base64,'
    f'{base64.b64encode(figures.png_bytes(figures.strip_figure(runs, m))).decode()}">'
    for m in present
  )
  with open(paths[2], "w") as f:
    f.write(
      f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>cxr_jax results</title>"
      f"</head><body><h1>Results on {html.escape(split)}</h1><pre>{html.escape(table)}"
      f"</pre>{pictures}</body></html>"
    )
  return paths


def main(argv: list[str]) -> None:
  run_dirs = argv[1:]
  if not run_dirs:
    raise app.UsageError("Give one or more run directories: python -m cxr_jax.results DIR...")
  args = flags.FLAGS
  out = args.output or os.path.commonpath([os.path.abspath(d) for d in run_dirs])
  paths = write_results(out, run_dirs, baseline=args.baseline, split=args.split)
  with open(paths[1]) as f:
    print(f.read())
  print(f"results: wrote {', '.join(paths)}", file=sys.stderr)


def define_flags() -> None:
  flags.DEFINE_string("output", "", "Where results.* go ('': the run directories' common parent).")
  flags.DEFINE_string("baseline", "", "The variant others are compared with ('': the first).")
  flags.DEFINE_string("split", "test", "The evaluated split to gather.")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
