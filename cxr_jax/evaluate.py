"""`python -m cxr_jax.evaluate --workdir=DIR --split=test [--checkpoint=latest|best]`

Scores a run at native resolution (`workflows.evaluation`) and writes DIR/eval/<split>.json
(aggregates), DIR/eval/<split>.csv (one row per image, `evaluation.CSV_FIELDS`) and
DIR/eval/<split>_report.html with its figures (`report`).

A fold ensemble: `--workdir=DIR1,DIR2,...` (or a sweep's variant folder) with `--out=OUT`
scores the runs' mean prediction (`ensemble.Ensemble`) into OUT/eval/ alike, with the paired
difference to each run's own evaluation of the same images (`workflows.ensemble_eval`).
"""

import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import app
from absl import flags
from etils import epath
from flax import nnx

from cxr_jax import cli
from cxr_jax import errors
from cxr_jax import report
from cxr_jax.core.run import csv_tables
from cxr_jax.core.run import run_data
from cxr_jax.core.run import rundir
from cxr_jax.core.run import trackers
from cxr_jax.core.run.layout import RunDir
from cxr_jax.data import paths
from cxr_jax.data import stress as stress_data
from cxr_jax.workflows import ensemble_eval
from cxr_jax.workflows import evaluation
from cxr_jax.workflows import lung_crop
from cxr_jax.workflows import task_scores


def json_safe(value: Any) -> Any:
  """JSON has no NaN: non-finite floats become null."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  return value


def run(
  workdir: str,
  split: str = "test",
  *,
  checkpoint: str = "latest",
  batch_size: int = 0,
  show_progress: bool = True,
  space: int = 0,
  tta: str = "",
  stress: str = "",
  out: str = "",
) -> dict[str, Any]:
  """Evaluates a run (or a fold ensemble) on `split`; writes DIR/eval/<split>.{json,csv},
  report and figures.

  Args:
    workdir: the run's --workdir; several runs ('DIR1,DIR2' or a folder of runs): their
      ensemble, written into `out`.
    split: dataset split to score ('test', 'validation', 'train').
    checkpoint: 'latest' or 'best'.
    batch_size: images per forward pass (0: the run's eval_batch_size).
    show_progress: progress bars on stderr.
    space: devices splitting each image's height (0: the run's config.mesh.space).
    tta: 'on' or 'off' overrides the run's config.tta; the outputs are then named
      <split>.tta_<on|off>.* (the run's own <split>.* stay), e.g. to measure what TTA buys.
    stress: a change of the test images (`data.stress.KINDS`, e.g. 'consolidation'); the
      outputs are named <split>.stress_<kind>.*.
    out: an ensemble's output folder (OUT/eval/, OUT/ensemble.json).

  Returns:
    The summary written to <split>.json.
  """
  runs = rundir.ensemble_runs(workdir)
  ensemble = None
  if len(runs) > 1:
    ensemble = ensemble_eval.restore(
      runs, checkpoint, split, out, space=space, batch_size=batch_size
    )
    workdir = out
  elif out:
    raise errors.ConfigError(
      f"--out={out!r} is for an ensemble (several --workdir runs); a run's evaluation goes "
      f"into its own DIR/eval/."
    )
  return _run(
    workdir,
    split,
    checkpoint=checkpoint,
    batch_size=batch_size,
    show_progress=show_progress,
    space=space,
    tta=tta,
    stress=stress,
    ensemble=ensemble,
  )


def run_model(
  config: ml_collections.ConfigDict,
  model: nnx.Module,
  out_dir: str,
  split: str,
  sources: Mapping[str, Sequence[Mapping[str, Any]]],
  *,
  batch_size: int = 0,
  show_progress: bool = True,
  stress: str = "",
) -> dict[str, Any]:
  """`run` with a model held in memory (a notebook's, a test's) on records given as
  {split: source} (with 'validation' for a classifier's threshold), writing into
  OUT_DIR/eval/ as `run` does into a run directory."""
  return _run(
    out_dir,
    split,
    batch_size=batch_size,
    show_progress=show_progress,
    restored=(config, model),
    sources=sources,
    stress=stress,
  )


def _run(
  workdir: str,
  split: str,
  *,
  checkpoint: str = "latest",
  batch_size: int = 0,
  show_progress: bool = True,
  restored: tuple[ml_collections.ConfigDict, nnx.Module] | None = None,
  sources: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
  space: int = 0,
  tta: str = "",
  stress: str = "",
  ensemble: ensemble_eval.Restored | None = None,
) -> dict[str, Any]:
  if ensemble is not None:
    config, model, step = ensemble.config, ensemble.inference, None
  elif restored is None:
    config, model, step = rundir.restore_model(workdir, checkpoint)
  else:
    (config, model), step = restored, None
  config = rundir.with_space(config, space)
  name = output_name(split, tta, stress)
  if tta:
    config = ml_collections.ConfigDict(config.to_dict())
    config.tta = tta == "on"
  if sources is not None:
    get_split = sources.__getitem__
  else:
    dataset = run_data.open_dataset(config.data)

    def get_split(name: str):
      source = run_data.load_split(config, name, dataset)
      return lung_crop.maybe_crop(config, name, source, workdir)

  def get_source(name: str):
    source = get_split(name)
    return stress_data.StressedSource(source, stress) if stress else source

  run_dir = RunDir(workdir)
  out_dir = run_dir.eval_dir
  # Everything is written into a folder of its own first (the CSV row by row as images are
  # scored) and then renamed into place, the JSON last: a kill leaves the previous
  # evaluation's files as they were (and every row names its step), never a CSV of one step
  # beside a JSON and report of another.
  staging = out_dir / f".{name}.writing-{os.getpid()}"
  staging.mkdir(parents=True, exist_ok=True)
  summary_name = run_dir.eval_summary(name).name
  try:
    table = str(staging / run_dir.eval_table(name).name)
    fields = [*evaluation.CSV_FIELDS, *task_scores.eval_fields(config)]
    with csv_tables.RowWriter(table, fields) as csv_rows:

      def write_row(row: dict) -> None:
        row["step"] = step
        csv_rows.write(row)

      summary, result = evaluation.evaluate_split(
        config,
        model,
        split,
        get_source,
        batch_size=batch_size,
        show_progress=show_progress,
        write_row=write_row,
      )
    steps = run_dir.checkpoint_steps()
    summary = {
      "split": split,
      "workdir": run_dir.root,
      "checkpoint": checkpoint,
      "step": step,
      "trained_steps": steps[-1] if steps else None,  # the newest checkpoint when evaluated
      **summary,
    }
    if stress:
      summary["stress"] = {"kind": stress, "what": stress_data.describe(stress)}
    if ensemble is not None:
      summary["ensemble"] = ensemble_eval.compare(ensemble, name, table, int(config.seed))
    html = report.write_report(str(staging), name, summary, result)
    summary["report"] = os.path.basename(html)
    (staging / summary_name).write_text(json.dumps(json_safe(summary), indent=2))
    _move_into_place(staging, out_dir, last=summary_name)
  finally:
    if staging.exists():  # stopped part-way: the previous outputs stay as they were
      staging.rmtree()
  html = str(out_dir / summary["report"])  # where the report was moved to
  if "classification" in summary and step is not None and not tta:
    # The temperature predict applies to this checkpoint (its p_abnormal_calibrated).
    calibration = {"step": step, "checkpoint": checkpoint}
    calibration.update(summary["classification"]["calibration"])
    paths.write_text(str(run_dir.calibration), json.dumps(calibration))
  logging.info("Wrote %s/%s.json, .csv and %s", out_dir, name, summary["report"])
  trackers.log_files(
    workdir, config, [str(run_dir.eval_summary(name)), str(run_dir.eval_table(name)), html]
  )
  return summary


def _move_into_place(staging: epath.Path, out_dir: epath.Path, *, last: str) -> None:
  """Renames every file of `staging` into `out_dir`, `last` at the end (the caller removes
  `staging`: a bucket has no empty folder to remove)."""
  files = sorted(staging.iterdir(), key=lambda p: p.name == last)
  for file in files:
    # Over the previous evaluation's file: os.replace on a disk (epath's rename refuses an
    # existing destination), a copy and delete in a bucket.
    file.replace(out_dir / file.name)


def output_name(split: str, tta: str, stress: str = "") -> str:
  """What DIR/eval/<name>.* is called: the split, with .tta_<on|off> where --tta overrides
  and .stress_<kind> under --stress."""
  return split + (f".tta_{tta}" if tta else "") + (f".stress_{stress}" if stress else "")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  args = flags.FLAGS
  summary = run(
    args.workdir,
    args.split,
    checkpoint=args.checkpoint,
    batch_size=args.batch_size,
    space=args.space,
    tta=args.tta,
    stress=args.stress,
    out=args.out,
  )
  name = output_name(args.split, args.tta, args.stress)
  lines = [
    f"evaluate: {summary['num_images']} {args.split} images, {summary['model']} "
    f"({args.checkpoint} checkpoint"
    + (f", step {summary['step']})" if summary["step"] is not None else "s)")
  ]
  if "segmentation" in summary:
    seg = summary["segmentation"]
    for variant in ("raw", "postprocessed"):
      overall = seg[variant]["all"]
      lines.append(
        f"  {variant:>13}: dice {overall['dice']['mean']:.4f} (median "
        f"{overall['dice']['median']:.4f}), hd95 {overall['hd95_px']['mean']:.2f} px, "
        f"asd {overall['asd_px']['mean']:.2f} px, area ratio median "
        f"{overall['area_ratio']['median']:.3f}"
      )
  if "classification" in summary:
    cls = summary["classification"]
    lines.append(
      f"  classifier: auc {cls['auc']:.4f} [{cls['auc_ci95'][0]:.4f}, "
      f"{cls['auc_ci95'][1]:.4f}], accuracy {cls['accuracy']:.4f}, sensitivity "
      f"{cls['sensitivity']:.4f} / specificity {cls['specificity']:.4f} at "
      f"{cls['threshold']:.3f}, ece {cls['ece']:.4f} (temperature "
      f"{cls['calibration']['temperature']:.2f} from validation: ece "
      f"{cls['calibration']['ece_after']:.4f})"
    )
  lines += ensemble_eval.describe(summary.get("ensemble"))
  written = RunDir(args.out or args.workdir).eval_summary(name)
  lines.append(f"  wrote {written}, .csv, {summary['report']}")
  print("\n".join(lines), file=sys.stderr)


def define_flags() -> None:
  """The command's flags; defined only when run as a command, so importing is side-free."""
  flags.DEFINE_string(
    "workdir",
    None,
    "Training workdir (config.json, checkpoints); several ('DIR1,DIR2,...', or a folder of "
    "runs such as a sweep's variant): their fold ensemble, written into --out.",
  )
  flags.DEFINE_string("out", "", "An ensemble's output folder (OUT/eval/, OUT/ensemble.json).")
  flags.DEFINE_string("split", "test", "Dataset split: test, validation or train.")
  flags.DEFINE_enum("checkpoint", "latest", rundir.CHECKPOINT_CHOICES, "Which checkpoint to score.")
  flags.DEFINE_integer(
    "batch_size", 0, "Images per forward pass (0: the run's eval_batch_size).", lower_bound=0
  )
  flags.DEFINE_integer(
    "space",
    0,
    "Devices of this host that split each image's height (config.mesh.space; 0: as trained).",
    lower_bound=0,
  )
  flags.DEFINE_enum(
    "tta",
    "",
    ["", "on", "off"],
    "Test-time augmentation: '' as the run's config.tta; on/off override it (outputs named "
    "<split>.tta_<on|off>.*).",
  )
  flags.DEFINE_enum(
    "stress",
    "",
    ["", *stress_data.KINDS],
    "Score the images with a lung mask changed as diseased lungs change them (data/stress.py: "
    "'consolidation', the lower lung turned tissue-bright, masks kept); outputs named "
    "<split>.stress_<kind>.*.",
  )
  flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
  define_flags()
  cli.run(main)
