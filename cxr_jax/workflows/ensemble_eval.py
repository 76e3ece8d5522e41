"""Evaluating a fold ensemble: its runs restored as one model (`ensemble.Ensemble`), checked
to score the same images none of them trained on, and compared, paired over those images,
with each run's own evaluation.

k-fold runs test on different folds, each on images the others trained on, so their
ensemble has no fair test split; a nested sweep's runs (`config.data.outer_fold=K`) all test
on fold K, which none trains on or validates on: that is the split an ensemble is scored on.
A classifier's threshold and temperature come from the first run's validation fold (the
other runs trained on it: the threshold is optimistic there; AUC does not depend on it).
"""

import csv
import dataclasses
import io
import json
import math
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from cxr_jax import errors
from cxr_jax.core.inference import ensemble
from cxr_jax.core.inference.inference import Inference
from cxr_jax.core.run import rundir
from cxr_jax.core.run.layout import RunDir
from cxr_jax.core.stats import paired_stats
from cxr_jax.data import paths

# config.data keys the runs of one ensemble may differ in (the fold is what k-fold varies).
FREE_DATA_KEYS = ("fold", "num_workers")


@dataclasses.dataclass
class Restored:
  runs: list[str]
  steps: list[int]
  checkpoint: str
  config: ml_collections.ConfigDict  # the first run's: every run scores its split's images
  inference: ensemble.Ensemble


def restore(
  runs: Sequence[str], checkpoint: str, split: str, out: str, *, space: int = 0, batch_size: int = 0
) -> Restored:
  """The runs' `checkpoint` as one ensemble; OUT/ensemble.json names them. ConfigError when
  there is no `out`, a run was trained on lung crops, or the runs' `split` images differ."""
  if not out:
    raise errors.ConfigError(
      "--out=OUT is needed for an ensemble: its evaluation goes into OUT/eval/ (its runs "
      "keep their own)."
    )
  configs, models, steps = zip(*rundir.restore_runs(runs, checkpoint, space=space))
  check_same_images(runs, configs, split)
  size = batch_size or int(configs[0].eval_batch_size)
  members = [Inference(c, m, batch_size=size) for c, m in zip(configs, models, strict=True)]
  record = {"runs": list(runs), "steps": list(steps), "checkpoint": checkpoint, "split": split}
  RunDir(out).path.mkdir(parents=True, exist_ok=True)
  paths.write_text(str(RunDir(out).path / "ensemble.json"), json.dumps(record, indent=2))
  return Restored(list(runs), list(steps), checkpoint, configs[0], ensemble.Ensemble(members, runs))


def check_same_images(
  runs: Sequence[str], configs: Sequence[ml_collections.ConfigDict], split: str
) -> None:
  """ConfigError unless every run's `split` holds the same images, none of them trained on."""
  first = configs[0].data.to_dict()
  for run, config in zip(runs[1:], configs[1:]):
    data = config.data.to_dict()
    differ = sorted(
      k for k in set(first) | set(data) if k not in FREE_DATA_KEYS and first.get(k) != data.get(k)
    )
    if differ:
      key = differ[0]
      raise errors.ConfigError(
        f"the ensemble's runs read different data: {runs[0]} has config.data.{key}="
        f"{first.get(key)!r}, {run} {data.get(key)!r}; ensemble runs of one sweep variant."
      )
  folds = sorted({int(c.data.fold) for c in configs})
  nested = first.get("split") == "kfold" and int(first.get("outer_fold", -1)) >= 0
  if first.get("split") == "kfold" and len(folds) > 1 and not (nested and split == "test"):
    raise errors.ConfigError(
      f"the ensemble's runs have different {split} images (config.data.fold {folds}): each "
      f"trained on images another one scores. Ensemble the runs of a nested sweep "
      f"(config.data.outer_fold=K: every run tests on fold K, which none trains on) and "
      f"evaluate --split=test."
    )


def _rows(text: str) -> dict[str, dict[str, str]]:
  return {row["id"]: row for row in csv.DictReader(io.StringIO(text))}


def _number(text: str | None) -> float:
  return float(text) if text not in ("", None) else math.nan


def compare(restored: Restored, name: str, table: str, seed: int) -> dict[str, Any]:
  """The ensemble's runs, and its paired difference to each run's own DIR/eval/<name>.csv
  (`table`: the ensemble's CSV): per run, Dice (mean over images both score) and AUC with
  95% bootstrap intervals; 'vs_runs': the ensemble against the runs' mean per image (Dice)
  and on average over runs (AUC, each run's images resampled in turn)."""
  ours = _rows(epath.Path(table).read_text())
  out: dict[str, Any] = {"runs": restored.runs, "steps": restored.steps, "runs_compared": []}
  dice_by_image: dict[str, list[float]] = {}
  auc_groups = []
  for run, step in zip(restored.runs, restored.steps, strict=True):
    entry: dict[str, Any] = {"run": run, "step": step}
    path = RunDir(run).eval_table(name)
    if not path.exists():
      entry["missing"] = f"no {path}: evaluate the run on this split to compare"
      out["runs_compared"].append(entry)
      continue
    theirs = _rows(path.read_text())
    shared = sorted(set(ours) & set(theirs))
    steps = {r.get("step") for r in theirs.values()}
    if steps != {str(step)}:
      entry["note"] = f"its evaluation is of step(s) {sorted(steps)}, not {step}"
    entry["images"] = len(shared)
    pairs = [(_number(ours[i].get("dice")), _number(theirs[i].get("dice")), i) for i in shared]
    pairs = [(a, b, i) for a, b, i in pairs if math.isfinite(a) and math.isfinite(b)]
    if pairs:
      a, b = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
      entry["dice"] = _paired_dice(a, b, "run", seed)
      for _, value, image in pairs:
        dice_by_image.setdefault(image, []).append(value)
    scored = [i for i in shared if ours[i].get("p_abnormal") and theirs[i].get("p_abnormal")]
    if scored:
      group = (
        np.array([int(ours[i]["label"]) for i in scored]),
        np.array([_number(ours[i]["p_abnormal"]) for i in scored]),
        np.array([_number(theirs[i]["p_abnormal"]) for i in scored]),
      )
      difference, lo, hi = paired_stats.paired_auc_difference([group], seed=seed)
      entry["auc"] = {"difference": difference, "ci95": [lo, hi]}
      auc_groups.append(group)
    out["runs_compared"].append(entry)
  vs_runs: dict[str, Any] = {}
  if dice_by_image:
    images = sorted(dice_by_image)
    a = np.array([_number(ours[i]["dice"]) for i in images])
    b = np.array([np.mean(dice_by_image[i]) for i in images])
    vs_runs["dice"] = {**_paired_dice(a, b, "runs_mean", seed), "images": len(images)}
  if auc_groups:
    difference, lo, hi = paired_stats.paired_auc_difference(auc_groups, seed=seed)
    vs_runs["auc"] = {"difference": difference, "ci95": [lo, hi], "runs": len(auc_groups)}
  out["vs_runs"] = vs_runs
  if "classification" in {h.task for h in restored.inference.heads}:
    out["threshold_from"] = (
      f"the validation split of {restored.runs[0]} (the other runs trained on it)"
    )
  return out


def _paired_dice(ours: np.ndarray, theirs: np.ndarray, name: str, seed: int) -> dict[str, Any]:
  """Mean Dice of the ensemble and of `name` over the same images, their difference and its
  95% paired bootstrap interval."""
  difference, lo, hi = paired_stats.paired_mean_difference(ours, theirs, seed=seed)
  return {"ensemble": ours.mean(), name: theirs.mean(), "difference": difference, "ci95": [lo, hi]}


def describe(record: dict[str, Any] | None) -> list[str]:
  """evaluate's lines on stderr for an ensemble (none for a run)."""
  if not record:
    return []
  lines = [f"  an ensemble of {len(record['runs'])} runs (steps {record['steps']})"]
  for metric, values in record.get("vs_runs", {}).items():
    lo, hi = values["ci95"]
    lines.append(
      f"  ensemble minus its runs' mean {metric}: {values['difference']:+.4f} [{lo:+.4f}, "
      f"{hi:+.4f}] (paired over the same images)"
    )
  for entry in record["runs_compared"]:
    if "missing" in entry:
      lines.append(f"  {entry['run']}: {entry['missing']}")
  return lines
