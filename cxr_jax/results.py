"""`python -m cxr_jax.results DIR... [--output=OUT] [--baseline=VARIANT] [--split=test]`

DIR and OUT may be local or gs:// URLs; a DIR with a glob (`gs://bucket/sweep/*/*`, quoted) is
expanded here, a shell does not expand URLs. Gathers run directories (config.json, eval/<split>.json and .csv, and sweep.json where a
sweep made them) into OUT/results.csv (a row per run), OUT/results.md and OUT/results.html:
per variant the mean and standard deviation over seeds and folds with a 95% t-interval, and
the paired difference to the baseline variant over the same images (per-image Dice: paired
bootstrap; AUC: paired bootstrap within each seed and fold), with a strip plot per metric.
"""

import base64
import collections
import csv
import html
import io
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app
from absl import flags
from etils import epath

from cxr_jax import cli
from cxr_jax import figures
from cxr_jax.core.run import csv_tables
from cxr_jax.core.run import layout
from cxr_jax.core.run import rundir
from cxr_jax.core.run.layout import RunDir
from cxr_jax.core.stats import metric_table
from cxr_jax.core.stats import paired_stats
from cxr_jax.data import paths
from cxr_jax.data import registry

RUN_COLUMNS = ("run", "variant", "seed", "fold", "step", "num_images")
# group: the dataset and task a run is compared within (runs of another dataset or task get
# their own table and baseline); finished: trained to its config.num_train_steps (unfinished
# runs are listed, not averaged).
GROUP_COLUMNS = ("group", "finished")


def metric_columns() -> tuple[str, ...]:
  """The metrics of a results row: the metric table's results entries in order, with the
  Dice and AUC of each source of every registered dataset after Dice and AUC
  (`dice_<source>`, `auc_<source>`)."""
  columns = []
  for metric in metric_table.RESULTS:
    columns.append(metric.name)
    if metric.name in ("dice", "auc"):
      columns += [f"{metric.name}_{source}" for source in registry.source_names()]
  return tuple(columns)


def read_run(workdir: str | RunDir, split: str) -> dict[str, Any] | None:
  """One run's row and per-image values; None when it has no evaluation of `split`."""
  run = RunDir(workdir)
  if not run.eval_summary(split).exists():
    return None
  try:
    summary = json.loads(run.eval_summary(split).read_text())
    group, num_train_steps = _group(run, summary)
    trained_to = _trained_to(run, summary)
  except (ValueError, KeyError, TypeError, AttributeError) as e:  # cut short, or edited
    print(
      f"results: skipping {run}: {' '.join(str(e).split())[:200]} (in "
      f"{run.eval_summary(split)} or its config.json; evaluate the run again)",
      file=sys.stderr,
    )
    return None
  if run.sweep_record.exists():
    record = json.loads(run.sweep_record.read_text())
  else:
    record = {"variant": run.path.name, "seed": None, "fold": None}
  row = {
    "run": str(run),
    "variant": record["variant"],
    "seed": record["seed"],
    "fold": record["fold"],
    "step": summary.get("step"),
    "num_images": summary.get("num_images"),
    "group": group,
    "finished": trained_to >= (num_train_steps or 0),
  }
  validation = _validation_at(run, summary.get("step"))
  row.update({m.name: m.result(summary, validation) for m in metric_table.RESULTS})
  if "segmentation" in summary:
    for source, values in summary["segmentation"]["raw"].get("per_source", {}).items():
      row[f"dice_{source}"] = values["dice"]["mean"]
  for source, values in summary.get("classification", {}).get("per_source", {}).items():
    row[f"auc_{source}"] = values["auc"]
  table = io.StringIO(run.eval_table(split).read_text())
  images = {r["id"]: r for r in csv.DictReader(table)}
  return {"row": row, "images": images, "trained_to": trained_to, "steps": num_train_steps}


def _trained_to(run: RunDir, summary: dict) -> int:
  """The newest checkpoint's step (the evaluated step where there are no checkpoints): a run
  evaluated at its best step may well have trained to the end."""
  return max(run.checkpoint_steps(), default=summary.get("step") or 0)


def _group(run: RunDir, summary: dict) -> tuple[str, int | None]:
  """(the dataset and task the run is compared within, its config.num_train_steps); the
  dataset is unknown ('') without config.json."""
  task = "+".join(t for t in ("segmentation", "classification") if t in summary) or "none"
  if not run.config.exists():
    return task, None
  record = rundir.read_record(str(run.config))
  data = record["config"].get("data", {})
  dataset = (record.get("dataset") or {}).get("name") or data.get("name", "")
  protocol = data.get("split", "hash")
  if protocol == "cross_site":
    protocol += f"[{data.get('train_sources', '')}]"
  return f"{dataset} {protocol} {task}", int(record["config"]["num_train_steps"])


def _validation_at(run: RunDir, step: int | None) -> dict[str, float]:
  """The validation row logged at `step` in DIR/metrics.jsonl ({} when absent)."""
  if step is None or not run.metrics.exists():
    return {}
  lines = [json.loads(line) for line in run.metrics.read_text().splitlines() if line.strip()]
  for line in lines:
    if line.get("split") == "validation" and line.get("step") == step:
      return line
  return {}


def _float(text: str) -> float:
  return float(text) if text not in ("", None) else math.nan


def compare(runs: Sequence[dict], baseline: str) -> dict[str, dict[str, tuple]]:
  """{variant: {'dice' | 'dice_worst10' | 'auc': (difference, lo, hi, n)}} against
  `baseline`, paired by (seed, fold, image id); dice_worst10: each run's own worst tenth of
  the same images, resampled together within each seed and fold."""
  by_key = {(r["row"]["variant"], r["row"]["seed"], r["row"]["fold"]): r for r in runs}
  out = collections.defaultdict(dict)
  for variant in sorted({r["row"]["variant"] for r in runs} - {baseline}):
    dice_a, dice_b, groups, dice_groups = [], [], [], []
    for (name, seed, fold), run in by_key.items():
      base = by_key.get((baseline, seed, fold))
      if name != variant or base is None:
        continue
      shared = sorted(set(run["images"]) & set(base["images"]))
      pairs = []
      for image in shared:
        a, b = _float(run["images"][image].get("dice")), _float(base["images"][image].get("dice"))
        if math.isfinite(a) and math.isfinite(b):
          pairs.append((a, b))
      if pairs:
        dice_a += [a for a, _ in pairs]
        dice_b += [b for _, b in pairs]
        dice_groups.append((np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])))
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
    if dice_groups:
      out[variant]["dice_worst10"] = (
        *paired_stats.paired_worst_tenth_difference(dice_groups),
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
  present = [m for m in metric_columns() if any(r["row"].get(m) is not None for r in runs)]
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
  out_dir: str, run_dirs: Sequence[str | RunDir], *, baseline: str = "", split: str = "test"
) -> list[str]:
  """Writes results.csv, results.md and results.html into `out_dir` (local or gs://);
  returns their paths."""
  everything = [run for run in (read_run(d, split) for d in run_dirs) if run is not None]
  if not everything:
    raise FileNotFoundError(
      f"None of the {len(run_dirs)} run directories has a readable eval/{split}.json."
    )
  out_dir = paths.resolve(out_dir)
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  written = [f"{out_dir}/results.{ext}" for ext in ("csv", "md", "html")]
  columns = RUN_COLUMNS + metric_columns() + GROUP_COLUMNS
  csv_tables.write_csv(written[0], columns, [r["row"] for r in everything])
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
  paths.write_text(
    written[1],
    f"# Results on {split} ({len(runs)} runs)\n\nmean +- std [95% t-interval over "
    f"runs]; the last column: the paired difference to the baseline over the same "
    f"images [95% bootstrap interval]; runs of another dataset, protocol or task are "
    f"compared in their own table.\n\n{table}\n",
  )
  present = [m for m in ("dice", "auc") if any(r["row"].get(m) is not None for r in runs)]
  pictures = "".join(
    f'<img alt="{m}" src="data:image/png;base64,'
    f'{base64.b64encode(figures.png_bytes(figures.strip_figure(runs, m))).decode()}">'
    for m in present
  )
  paths.write_text(
    written[2],
    f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>cxr_jax results</title>"
    f"</head><body><h1>Results on {html.escape(split)}</h1><pre>{html.escape(table)}"
    f"</pre>{pictures}</body></html>",
  )
  return written


def common_parent(run_dirs: Sequence[RunDir]) -> str:
  """The deepest folder holding every run directory (the run itself when one; URLs compared
  by their parts)."""
  parts = [run.root.split("/") for run in run_dirs]
  common = []
  for level in zip(*parts):
    if any(part != level[0] for part in level):
      break
    common.append(level[0])
  return "/".join(common) or "/"


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    raise app.UsageError("Give one or more run directories: python -m cxr_jax.results DIR...")
  run_dirs = [run for pattern in argv[1:] for run in layout.run_dirs(pattern)]
  if not run_dirs:
    raise app.UsageError(f"No run directory (with a config.json) matches {argv[1:]}.")
  args = flags.FLAGS
  out = args.output or common_parent(run_dirs)
  written = write_results(out, run_dirs, baseline=args.baseline, split=args.split)
  print(epath.Path(written[1]).read_text())
  print(f"results: wrote {', '.join(written)}", file=sys.stderr)


def define_flags() -> None:
  flags.DEFINE_string("output", "", "Where results.* go ('': the run directories' common parent).")
  flags.DEFINE_string("baseline", "", "The variant others are compared with ('': the first).")
  flags.DEFINE_string("split", "test", "The evaluated split to gather.")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
