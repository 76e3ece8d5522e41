"""Evaluation at native resolution, written to the workdir.

    python -m cxr_jax.evaluate --workdir=DIR --split=test [--checkpoint=latest|best]

Restores the run (config.json, checkpoint), reads the split of the dataset named in its
config, predicts letterboxed batches (the input pipeline's eval batches), maps each mask
prediction back to its image's native size and scores it there (`surface.py`: Dice, IoU,
precision, recall, HD95, ASSD in px and mm), raw and post-processed (`postprocess.py`).
A classifier gets accuracy, AUC with a bootstrap 95% interval, sensitivity and specificity at
the threshold chosen on the validation split (Youden's J) and the expected calibration error.

Writes DIR/eval/<split>.json (aggregates), DIR/eval/<split>.csv (one row per image),
DIR/eval/<split>_report.html and its figures as DIR/eval/<split>_*.png (`report.py`).

The CSV's columns (CSV_FIELDS; blank where not defined): id, source, label, has_mask, height,
width, spacing_mm, spacing_estimated; the mask metrics of the raw prediction (`surface`) and
the same with `_post` for the post-processed one; `lung_fraction`, the fraction of the image's
pixels in the raw predicted mask (`predict.native_mask`: p(lung) >= MASK_THRESHOLD at the
native size; the same definition as predict's CSV) and `lung_fraction_post`, the same of the
post-processed mask; `p_abnormal` for classifiers. AUCs are `metrics.roc_auc`.
"""

from collections.abc import Mapping, Sequence
import csv
import dataclasses
import datetime
import json
import logging
import math
import os
import sys
from typing import Any

from absl import app
from absl import flags
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from cxr_jax import metrics
from cxr_jax import postprocess
from cxr_jax import predict
from cxr_jax import quiet_logs
from cxr_jax import surface
from cxr_jax.data import kaggle_archive
from cxr_jax.data import preprocess
from cxr_jax.data import records

SOURCE_NAMES = kaggle_archive.SOURCES  # dataset ClassLabel order: montgomery, shenzhen, synthetic
LABEL_NAMES = ("normal", "abnormal")
NUM_BOOTSTRAP = 1000
NUM_CALIBRATION_BINS = 10
NUM_WORST = 5
NUM_ATTENTION_CASES = 4
THUMBNAIL_SIDE = 320  # pixels kept per image for the report's pictures

CSV_FIELDS = (
    ["id", "source", "label", "has_mask", "height", "width", "spacing_mm", "spacing_estimated"]
    + list(surface.MASK_METRICS) + [f"{m}_post" for m in surface.MASK_METRICS]
    + ["lung_fraction", "lung_fraction_post", "p_abnormal"])


# ----- classifier statistics -----

def roc_curve(labels: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
  """{'fpr', 'tpr', 'threshold'}: operating points of `score >= threshold`, from (0, 0)."""
  labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, np.float64)
  thresholds = np.concatenate([[np.inf], np.unique(scores)[::-1]])
  predicted = scores[None, :] >= thresholds[:, None]
  tpr = (predicted & labels).sum(1) / max(int(labels.sum()), 1)
  fpr = (predicted & ~labels).sum(1) / max(int((~labels).sum()), 1)
  return {"fpr": fpr, "tpr": tpr, "threshold": thresholds}


def bootstrap_auc_interval(labels: np.ndarray, scores: np.ndarray, *, seed: int,
                           num_samples: int = NUM_BOOTSTRAP,
                           level: float = 0.95) -> tuple[float, float]:
  """Percentile bootstrap interval of the AUC (resampling images with replacement).

  Resamples holding a single class have no AUC and are drawn again; seeded, so the same
  predictions always give the same interval.
  """
  labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, np.float64)
  if labels.all() or not labels.any():
    return math.nan, math.nan
  rng = np.random.default_rng(seed)
  aucs = []
  while len(aucs) < num_samples:
    index = rng.integers(0, len(labels), len(labels))
    if labels[index].any() and not labels[index].all():
      aucs.append(metrics.roc_auc(scores=scores[index], labels=labels[index]))
  alpha = (1 - level) / 2
  lo, hi = np.quantile(aucs, [alpha, 1 - alpha])
  return float(lo), float(hi)


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
  """The threshold maximising sensitivity + specificity - 1 (ties: the highest threshold).

  Returned as the midpoint between the chosen score and the next lower one, so a test score
  equal to a validation score is not decided by floating-point luck. NaN with one class.
  """
  labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, np.float64)
  if labels.all() or not labels.any():
    return math.nan
  curve = roc_curve(labels, scores)
  # Rounded so equal J in exact arithmetic ties; the first (highest threshold) wins.
  best = int(np.argmax(np.round(curve["tpr"] - curve["fpr"], 12)))
  chosen = curve["threshold"][best]
  if not np.isfinite(chosen):
    return float(scores.max()) + 1e-6
  lower = scores[scores < chosen]
  return float((chosen + lower.max()) / 2) if lower.size else float(chosen) / 2


def sensitivity_specificity(labels: np.ndarray, scores: np.ndarray,
                            threshold: float) -> tuple[float, float]:
  """(sensitivity, specificity) of `score >= threshold`; NaN for a class that is absent."""
  labels, predicted = np.asarray(labels).astype(bool), np.asarray(scores) >= threshold
  sens = (predicted & labels).sum() / labels.sum() if labels.any() else math.nan
  spec = (~predicted & ~labels).sum() / (~labels).sum() if (~labels).any() else math.nan
  return float(sens), float(spec)


def reliability_bins(labels: np.ndarray, probs: np.ndarray,
                     num_bins: int = NUM_CALIBRATION_BINS) -> dict[str, np.ndarray]:
  """Equal-width bins of p(abnormal): {'lower', 'upper', 'count', 'confidence', 'accuracy'}.

  confidence: the bin's mean predicted probability; accuracy: its observed fraction of
  abnormal images (NaN for an empty bin). The last bin includes 1.0.
  """
  labels, probs = np.asarray(labels, np.float64), np.asarray(probs, np.float64)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  which = np.clip(np.digitize(probs, edges[1:-1], right=False), 0, num_bins - 1)
  count = np.bincount(which, minlength=num_bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    confidence = np.bincount(which, probs, num_bins) / count
    accuracy = np.bincount(which, labels, num_bins) / count
  return {"lower": edges[:-1], "upper": edges[1:], "count": count,
          "confidence": confidence, "accuracy": accuracy}


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray,
                               num_bins: int = NUM_CALIBRATION_BINS) -> float:
  """ECE of p(abnormal): sum over bins of (count / N) * |observed - mean predicted|."""
  bins = reliability_bins(labels, probs, num_bins)
  used = bins["count"] > 0
  if not used.any():
    return math.nan
  gaps = np.abs(bins["accuracy"][used] - bins["confidence"][used])
  return float((bins["count"][used] * gaps).sum() / bins["count"].sum())


def classification_summary(labels: np.ndarray, probs: np.ndarray, *, threshold: float,
                           threshold_from: str, seed: int) -> dict[str, Any]:
  """Every classifier number evaluate reports, at the given (validation-chosen) threshold."""
  labels, probs = np.asarray(labels).astype(bool), np.asarray(probs, np.float64)
  lo, hi = bootstrap_auc_interval(labels, probs, seed=seed)
  sens, spec = sensitivity_specificity(labels, probs, threshold)
  return {
      "num_images": int(labels.size), "num_abnormal": int(labels.sum()),
      "accuracy": float(((probs >= 0.5) == labels).mean()),
      "accuracy_at_threshold": float(((probs >= threshold) == labels).mean()),
      "auc": metrics.roc_auc(scores=probs, labels=labels), "auc_ci95": [lo, hi],
      "threshold": threshold, "threshold_from": threshold_from,
      "sensitivity": sens, "specificity": spec,
      "ece": expected_calibration_error(labels, probs),
      "bootstrap_samples": NUM_BOOTSTRAP, "bootstrap_seed": seed,
  }


# ----- predicting a split -----

@dataclasses.dataclass
class Case:
  """What the report draws of one image: small copies of image, truth and prediction."""
  id: str
  source: str
  image: np.ndarray  # uint8 [h, w] (longest side THUMBNAIL_SIDE at most)
  truth: np.ndarray | None  # bool [h, w]
  pred: np.ndarray | None  # bool [h, w], raw
  pred_post: np.ndarray | None
  attention: list[np.ndarray] | None = None  # gate maps [s, s] at the model's resolution
  model_input: np.ndarray | None = None  # [S, S] the letterboxed image the gates look at


@dataclasses.dataclass
class SplitResult:
  rows: list[dict]  # one per image (CSV_FIELDS)
  cases: dict[str, Case]
  labels: np.ndarray  # [N] int, all images
  probs: np.ndarray | None  # [N] p(abnormal), classifiers only


def _thumbnail(array: np.ndarray) -> np.ndarray:
  """A copy with its longest side at most THUMBNAIL_SIDE (uint8 images, bool masks)."""
  height, width = array.shape
  scale = THUMBNAIL_SIDE / max(height, width)
  if scale >= 1:
    return array.copy()
  size = (max(1, round(width * scale)), max(1, round(height * scale)))
  if array.dtype == np.bool_:
    small = Image.fromarray(array.astype(np.uint8) * 255).resize(size, Image.Resampling.BOX)
    return np.asarray(small) >= 128
  return np.asarray(Image.fromarray(array).resize(size, Image.Resampling.BILINEAR,
                                                  reducing_gap=3.0))


def _source_name(index: int) -> str:
  return SOURCE_NAMES[index] if 0 <= index < len(SOURCE_NAMES) else str(index)


def predict_split(inference: predict.Inference, config: ml_collections.ConfigDict,
                  source: Sequence[Mapping[str, Any]], *, native: bool = True,
                  progress: str = "") -> SplitResult:
  """Predicts every example of `source` (eval batches) and scores it at native resolution.

  native=False only collects labels and p(abnormal) (threshold choice on validation).
  """
  from cxr_jax.data import input_pipeline

  batches = input_pipeline.create_eval_batches(config, source, process_index=0,
                                               process_count=1)
  rows, cases, labels, probs = [], {}, [], []
  bar = predict.Progress(len(source), progress) if progress else None
  attention_left = NUM_ATTENTION_CASES
  position = 0  # eval batches keep the source's order: the k-th real example is source[k]
  for batch in batches:
    outputs = inference(batch["image"])
    for i in np.flatnonzero(batch["weight"] > 0):
      labels.append(int(batch["label"][i]))
      p = float(outputs["p_abnormal"][i]) if inference.classifies else None
      probs.append(p)
      if native:
        record = source[position]
        if records.decode_id(record["id"]) != batch["id"][i]:
          raise RuntimeError(f"eval batch order differs from the source at {position}: "
                             f"{batch['id'][i]!r} vs {records.decode_id(record['id'])!r}")
        row, case = _score_image(record, batch, i, outputs, inference)
        row["p_abnormal"] = p
        if attention_left and "attention" in outputs and case.truth is not None:
          case.attention = [a[i] for a in outputs["attention"]]
          case.model_input = batch["image"][i, ..., 0]
          attention_left -= 1
        rows.append(row)
        cases[row["id"]] = case
      position += 1
    if bar:
      bar.update(int((batch["weight"] > 0).sum()))
  if bar:
    bar.close()
  return SplitResult(rows, cases, np.asarray(labels, np.int64),
                     np.asarray(probs, np.float64) if inference.classifies else None)


def _score_image(record: Mapping[str, Any], batch: Mapping[str, np.ndarray], i: int,
                 outputs: Mapping[str, Any], inference: predict.Inference) -> tuple[dict, Case]:
  """Per-image row (metrics at native size) and its report thumbnails."""
  image = np.asarray(record["image"])[..., 0]
  height, width = image.shape
  src = _source_name(int(batch["source"][i]))
  has_mask = bool(record.get("has_mask", False))
  spacing = surface.pixel_spacing(src, height, width)
  row = {"id": batch["id"][i], "source": src, "label": int(batch["label"][i]),
         "has_mask": int(has_mask), "height": height, "width": width,
         "spacing_mm": "" if spacing is None else f"{spacing.row_mm:.4f}x{spacing.col_mm:.4f}",
         "spacing_estimated": "" if spacing is None else int(spacing.estimated)}
  case = Case(row["id"], src, _thumbnail(image), None, None, None)
  if inference.segments:
    box = preprocess.Letterbox(
        scale=float(batch["scale"][i]), pad_top=int(batch["pad"][i][0]),
        pad_left=int(batch["pad"][i][1]), height=height, width=width)
    pred = predict.native_mask(outputs["prob"][i], box, clean=False)
    pred_post = postprocess.clean_mask(pred)  # == native_mask(..., clean=True)
    row["lung_fraction"] = float(pred.mean())
    row["lung_fraction_post"] = float(pred_post.mean())
    case.pred, case.pred_post = _thumbnail(pred), _thumbnail(pred_post)
    if has_mask:
      truth = np.asarray(record["mask"])[..., 0] > 0
      row.update(surface.mask_metrics(pred, truth, spacing))
      row.update({f"{k}_post": v for k, v in
                  surface.mask_metrics(pred_post, truth, spacing).items()})
      case.truth = _thumbnail(truth)
  return row, case


# ----- the command -----

def _finite(value: Any) -> Any:
  """JSON has no NaN: non-finite floats become null."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _finite(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite(v) for v in value]
  return value


def _csv_value(value: Any) -> Any:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return ""
  return f"{value:.6g}" if isinstance(value, float) else value


def write_csv(rows: Sequence[Mapping[str, Any]], path: str) -> None:
  """DIR/eval/<split>.csv: CSV_FIELDS, one row per image; blank where not defined."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
      writer.writerow({k: _csv_value(row.get(k)) for k in CSV_FIELDS})


def load_split(config: ml_collections.ConfigDict, split: str,
               workdir: str) -> Sequence[Mapping[str, Any]]:
  """The run's dataset split as a random-access source (prepares the dataset if missing).

  Cropped to the lungs, as in training, when the run classifies lung crops.
  """
  from cxr_jax.data import lung_crop
  from cxr_jax.data import prepare

  name, manual_dir = prepare.resolve_name(config.data)
  builder = prepare.load_builder(
      name, data_dir=os.path.expanduser(config.data.data_dir), manual_dir=manual_dir,
      synthetic_examples=int(config.data.synthetic_examples))
  if split not in builder.info.splits:
    raise ValueError(f"--split={split!r} not in dataset {name!r}; valid: "
                     f"{sorted(builder.info.splits)}.")
  return lung_crop.maybe_crop(config, split, builder.as_data_source(split), workdir)


def checkpoint_step(workdir: str, config: ml_collections.ConfigDict, which: str) -> int | None:
  """The step `restore_for_inference(workdir, which)` restores (for the record)."""
  from cxr_jax import checkpoint as checkpoint_lib

  manager = checkpoint_lib.create_manager(workdir, config, read_only=True)
  return manager.latest_step() if which == "latest" else checkpoint_lib.best_step(manager)


def evaluate(workdir: str, split: str = "test", *, checkpoint: str = "latest",
             batch_size: int = 0, progress: bool = True,
             restored: tuple[ml_collections.ConfigDict, nnx.Module] | None = None,
             sources: Mapping[str, Sequence[Mapping[str, Any]]] | None = None
             ) -> dict[str, Any]:
  """Evaluates a run on `split`; writes DIR/eval/<split>.{json,csv}, report and figures.

  Args:
    workdir: the run's --workdir.
    split: dataset split to score ('test', 'validation', 'train').
    checkpoint: 'latest' or 'best'.
    batch_size: images per forward pass (0: the run's eval_batch_size).
    progress: progress bars on stderr.
    restored: (config, model) to use instead of the workdir's checkpoint (tests).
    sources: {split: source} to use instead of the run's dataset (tests).

  Returns:
    The summary written to <split>.json.
  """
  from cxr_jax import checkpoint as checkpoint_lib
  from cxr_jax import report

  if restored is None:
    config, model = checkpoint_lib.restore_for_inference(workdir, checkpoint)
    step = checkpoint_step(workdir, config, checkpoint)
  else:
    (config, model), step = restored, None
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy: we set batch sizes
  config.eval_batch_size = batch_size or int(config.eval_batch_size)
  config.data.num_workers = 0
  get_source = (lambda s: sources[s]) if sources is not None else (lambda s: load_split(config, s, workdir))

  inference = predict.Inference(config, model, batch_size=config.eval_batch_size,
                                attention=True)
  result = predict_split(inference, config, get_source(split),
                         progress=f"evaluate {split}" if progress else "")
  summary: dict[str, Any] = {
      "split": split, "workdir": os.path.abspath(workdir), "checkpoint": checkpoint,
      "step": step, "model": config.model.name, "dataset": config.data.name,
      "image_size": int(config.data.image_size), "num_images": len(result.rows),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  if inference.segments:
    summary["segmentation"] = _segmentation_summary(result.rows, config)
  if inference.classifies:
    summary["classification"] = _classification_summary(
        result, inference, config, split, get_source, progress)

  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  write_csv(result.rows, os.path.join(out_dir, f"{split}.csv"))
  html = report.write_report(out_dir, split, summary, result)
  summary["report"] = os.path.basename(html)
  with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
    json.dump(_finite(summary), f, indent=2)
  logging.info("Wrote %s/%s.json, .csv and %s", out_dir, split, summary["report"])
  return summary


def _segmentation_summary(rows: Sequence[Mapping[str, Any]],
                          config: ml_collections.ConfigDict) -> dict[str, Any]:
  masked = [r for r in rows if r["has_mask"]]
  post_rows = [{"id": r["id"], "source": r["source"],
                **{m: r[f"{m}_post"] for m in surface.MASK_METRICS}} for r in masked]
  raw = surface.aggregate(masked, num_worst=NUM_WORST)
  post = surface.aggregate(post_rows, num_worst=NUM_WORST)
  estimated = any(r.get("spacing_estimated") == 1 for r in masked)
  return {
      "num_images_with_mask": len(masked),
      "primary": "postprocessed" if config.get("postprocess", False) else "raw",
      "raw": raw, "postprocessed": post,
      "dice": raw["all"]["dice"]["mean"], "dice_postprocessed": post["all"]["dice"]["mean"],
      "notes": {
          "threshold": f"p(lung) >= {predict.MASK_THRESHOLD} after bilinear mapping to the "
                       "native size",
          "postprocessed": "two largest 8-connected components kept, holes filled",
          "empty_masks": "both empty: overlap 1, distances 0; one empty: overlap 0, "
                         "distances = image diagonal",
          "hd95": "95th percentile of boundary distances, both directions pooled",
          "asd": "average symmetric surface distance (mean of the two directed means)",
          "mm": ("Montgomery only; spacing estimated from 0.0875 mm at 4892x4020 because "
                 "the images are resized" if estimated else
                 "Montgomery only (0.0875 mm); other sources have no known spacing"),
      },
  }


def _classification_summary(result: SplitResult, inference: predict.Inference,
                            config: ml_collections.ConfigDict, split: str, get_source,
                            progress: bool) -> dict[str, Any]:
  if split == "validation":
    labels, probs, origin = result.labels, result.probs, "validation (the evaluated split)"
  else:
    val = predict_split(inference, config, get_source("validation"), native=False,
                        progress="threshold on validation" if progress else "")
    labels, probs, origin = val.labels, val.probs, "validation"
  threshold = youden_threshold(labels, probs)
  if not math.isfinite(threshold):
    threshold, origin = 0.5, "0.5 (validation has a single class)"
  summary = classification_summary(result.labels, result.probs, threshold=threshold,
                                   threshold_from=origin, seed=int(config.seed))
  per_source = {}
  for name in SOURCE_NAMES:
    index = np.array([r["source"] == name for r in result.rows], bool)
    if index.any():
      per_source[name] = {
          "num_images": int(index.sum()),
          "auc": metrics.roc_auc(scores=result.probs[index], labels=result.labels[index]),
          "accuracy": float(((result.probs[index] >= 0.5) == result.labels[index]).mean())}
  summary["per_source"] = per_source
  return summary


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  quiet_logs.install()
  f = flags.FLAGS
  summary = evaluate(f.workdir, f.split, checkpoint=f.checkpoint, batch_size=f.batch_size)
  lines = [f"evaluate: {summary['num_images']} {f.split} images, {summary['model']} "
           f"({f.checkpoint} checkpoint, step {summary['step']})"]
  if "segmentation" in summary:
    seg = summary["segmentation"]
    for variant in ("raw", "postprocessed"):
      a = seg[variant]["all"]
      lines.append(f"  {variant:>13}: dice {a['dice']['mean']:.4f} (median "
                   f"{a['dice']['median']:.4f}), hd95 {a['hd95_px']['mean']:.2f} px, "
                   f"asd {a['asd_px']['mean']:.2f} px")
  if "classification" in summary:
    c = summary["classification"]
    lines.append(f"  classifier: auc {c['auc']:.4f} [{c['auc_ci95'][0]:.4f}, "
                 f"{c['auc_ci95'][1]:.4f}], accuracy {c['accuracy']:.4f}, sensitivity "
                 f"{c['sensitivity']:.4f} / specificity {c['specificity']:.4f} at "
                 f"{c['threshold']:.3f}, ece {c['ece']:.4f}")
  lines.append(f"  wrote {os.path.join(f.workdir, 'eval', f.split)}.json, .csv, "
               f"{summary['report']}")
  print("\n".join(lines), file=sys.stderr)


def define_flags() -> None:
  """The command's flags; defined only when run as a command, so importing is side-free."""
  flags.DEFINE_string("workdir", None, "Training workdir (config.json, checkpoints).")
  flags.DEFINE_string("split", "test", "Dataset split: test, validation or train.")
  flags.DEFINE_enum("checkpoint", "latest", ["latest", "best"], "Which checkpoint to score.")
  flags.DEFINE_integer("batch_size", 0, "Images per forward pass (0: the run's "
                       "eval_batch_size).")
  flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
  define_flags()
  app.run(main)
