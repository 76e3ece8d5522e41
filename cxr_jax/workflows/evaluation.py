"""Native-resolution evaluation of a trained model on a dataset split.

Predicts letterboxed eval batches, maps each mask back to its image's native size and
scores it there (`surface`), raw and post-processed; a classifier gets AUC with a bootstrap
interval, sensitivity and specificity at the threshold chosen on validation (Youden's J)
and the calibration error (`classification_stats`).
"""

import dataclasses
import datetime
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from cxr_jax.core.inference import ensemble
from cxr_jax.core.inference import overlays
from cxr_jax.core.inference import postprocess
from cxr_jax.core.inference.inference import Inference
from cxr_jax.core.inference.inference import native_mask
from cxr_jax.core.run.progress import Progress
from cxr_jax.core.stats import classification_stats
from cxr_jax.core.stats import metric_table
from cxr_jax.data import datasets
from cxr_jax.data import input_pipeline
from cxr_jax.data import preprocess
from cxr_jax.data import records
from cxr_jax.data import registry
from cxr_jax.workflows import split_summaries
from cxr_jax.workflows import task_scores

NUM_ATTENTION_CASES = 4
THUMBNAIL_SIDE = 320  # pixels kept per image for the report's pictures

# evaluate's per-image CSV (blank where not defined). lung_fraction: the fraction of the
# image's pixels in the raw predicted mask (`native_mask`, as predict's CSV); `_post`: of the
# post-processed mask.
CSV_FIELDS = (
  ["id", "step", "source", "label", "has_mask", "height", "width", "spacing_mm"]
  + ["spacing_estimated", *metric_table.MASK_METRICS]
  + [f"{m}_post" for m in metric_table.MASK_METRICS]
  + ["lung_fraction", "lung_fraction_post", "uncertainty", "flagged"]
  + ["p_abnormal", "p_abnormal_calibrated"]
)
_ONE_PROCESS = {"process_index": 0, "process_count": 1}


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
  # model.structures: name -> (predicted bool [h, w], reference or None), lungs included
  structures: dict[str, tuple[np.ndarray, np.ndarray | None]] | None = None


@dataclasses.dataclass
class SplitResult:
  """rows: one per image (CSV_FIELDS; scalars only). cases: id -> Case, drawn when asked for
  (`CaseLookup`: the report draws a handful). attention: the first images with a reference
  mask and gate maps (NUM_ATTENTION_CASES at most)."""

  rows: list[dict]
  cases: Mapping[str, Case]
  labels: np.ndarray  # [N] int, all images
  probs: np.ndarray | None  # [N] p(abnormal), classifiers only
  attention: list[Case] = dataclasses.field(default_factory=list)


class _OneRecord(Sequence):
  """Record `position` of `source` as a source of one, with the source's finding names (the
  targets of a findings head are read by name)."""

  def __init__(self, source, position: int):
    self._record = source[position]
    self.finding_names = datasets.finding_names(source)

  def __len__(self) -> int:
    return 1

  def __getitem__(self, index: int):
    if index not in (0, -1):
      raise IndexError(index)
    return self._record


class CaseLookup(Mapping):
  """id -> Case, made when first asked for by predicting that image again, so evaluation
  holds no image per image (every image's thumbnails: ~40 GB at 100k real X-rays)."""

  def __init__(self, inference: Inference, config, source, positions: dict[str, int]):
    self._inference, self._config, self._source = inference, config, source
    self._positions = positions
    self._made: dict[str, Case] = {}

  def __getitem__(self, image_id: str) -> Case:
    if image_id not in self._made:
      one = _OneRecord(self._source, self._positions[image_id])
      record = one[0]
      batches = input_pipeline.create_eval_batches(self._config, one, **_ONE_PROCESS)
      batch = next(iter(batches))
      outputs = self._inference(batch["image"])
      self._made[image_id] = _score_image(record, batch, 0, outputs, self._inference)[1]
    return self._made[image_id]

  def __iter__(self):
    return iter(self._positions)

  def __len__(self) -> int:
    return len(self._positions)


def predict_split(
  inference: Inference,
  config: ml_collections.ConfigDict,
  source: Sequence[Mapping[str, Any]],
  *,
  native: bool = True,
  show_progress: bool = False,
  label: str = "evaluate",
  write_row: Callable[[dict], None] | None = None,
  calibrate: Callable[[float], float] | None = None,
) -> SplitResult:
  """Predicts every example of `source` (eval batches) and scores it at native resolution,
  one image at a time: each row goes to `write_row` as soon as it is scored (with
  p_abnormal_calibrated from `calibrate`), and no image is kept (`CaseLookup`).

  native=False only collects labels and p(abnormal) (threshold choice on validation).
  """
  batches = input_pipeline.create_eval_batches(config, source, **_ONE_PROCESS)
  rows, positions, attention, labels, probs = [], {}, [], [], []
  bar = Progress(len(source), label) if show_progress else None
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
          raise RuntimeError(
            f"eval batch order differs from the source at {position}: "
            f"{batch['id'][i]!r} vs {records.decode_id(record['id'])!r}"
          )
        row, case = _score_image(record, batch, i, outputs, inference)
        row["p_abnormal"] = p
        if p is not None and calibrate is not None:
          row["p_abnormal_calibrated"] = calibrate(p)
        if attention_left and "attention" in outputs and case.truth is not None:
          case.attention = [a[i] for a in outputs["attention"]]
          case.model_input = batch["image"][i, ..., 0]
          attention.append(case)
          attention_left -= 1
        rows.append(row)
        positions[row["id"]] = position
        if write_row is not None:
          write_row(row)
      position += 1
    if bar:
      bar.update(int((batch["weight"] > 0).sum()))
  if bar:
    bar.close()
  return SplitResult(
    rows,
    CaseLookup(inference, config, source, positions),
    np.asarray(labels, np.int64),
    np.asarray(probs, np.float64) if inference.classifies else None,
    attention,
  )


def _score_image(
  record: Mapping[str, Any],
  batch: Mapping[str, np.ndarray],
  i: int,
  outputs: Mapping[str, Any],
  inference: Inference,
) -> tuple[dict, Case]:
  """Per-image row (metrics at native size) and its report thumbnails."""
  image = np.asarray(record["image"])[..., 0]
  height, width = image.shape
  src = _source_name(int(batch["source"][i]))
  has_mask = bool(record.get("has_mask", False))
  spacing = _spacing(record)
  row = {
    "id": batch["id"][i],
    "source": src,
    "label": int(batch["label"][i]),
    "has_mask": int(has_mask),
    "height": height,
    "width": width,
    "spacing_mm": "" if spacing is None else f"{spacing[0]:.4f}x{spacing[1]:.4f}",
    "spacing_estimated": "" if spacing is None else int(record["spacing_estimated"]),
  }
  case = Case(row["id"], src, overlays.thumbnail(image, THUMBNAIL_SIDE), None, None, None)
  if inference.segments:
    box = preprocess.Letterbox(
      scale=float(batch["scale"][i]),
      pad_top=int(batch["pad"][i][0]),
      pad_left=int(batch["pad"][i][1]),
      height=height,
      width=width,
    )
    pred = native_mask(outputs["prob"][i], box, clean=False)
    pred_post = postprocess.clean_mask(pred)  # == native_mask(..., clean=True)
    row["lung_fraction"] = float(pred.mean())
    row["lung_fraction_post"] = float(pred_post.mean())
    row["uncertainty"] = float(outputs["uncertainty"][i])
    row["flagged"] = int(row["uncertainty"] > inference.qc_threshold)
    case.pred, case.pred_post = (
      overlays.thumbnail(pred, THUMBNAIL_SIDE),
      overlays.thumbnail(pred_post, THUMBNAIL_SIDE),
    )
    if has_mask:
      truth = np.asarray(record["mask"])[..., 0] > 0
      row.update(metric_table.mask_metrics(pred, truth, spacing))
      row.update(
        {f"{k}_post": v for k, v in metric_table.mask_metrics(pred_post, truth, spacing).items()}
      )
      case.truth = overlays.thumbnail(truth, THUMBNAIL_SIDE)
    masks = task_scores.structure_masks(record, outputs, i, box)
    if masks:
      row.update(task_scores.structure_columns(record, masks, pred, spacing))
      case.structures = {"lungs": (case.pred, case.truth)}
      for name, (mask, truth) in masks.items():
        thumb = overlays.thumbnail(truth, THUMBNAIL_SIDE) if truth is not None else None
        case.structures[name] = (overlays.thumbnail(mask, THUMBNAIL_SIDE), thumb)
  row.update(task_scores.finding_columns(batch, outputs, i, inference.config))
  return row, case


def _spacing(record: Mapping[str, Any]) -> tuple[float, float] | None:
  """The record's pixel spacing (row_mm, col_mm); None when the dataset does not know it."""
  spacing = np.asarray(record.get("spacing_mm", (0.0, 0.0)), np.float64)
  return (float(spacing[0]), float(spacing[1])) if (spacing > 0).all() else None


def _source_name(index: int) -> str:
  names = registry.source_names()
  return names[index] if 0 <= index < len(names) else str(index)


def evaluate_split(
  config: ml_collections.ConfigDict,
  model: nnx.Module | ensemble.Ensemble,
  split: str,
  get_source: Callable[[str], Sequence[Mapping[str, Any]]],
  *,
  batch_size: int = 0,
  show_progress: bool = True,
  write_row: Callable[[dict], None] | None = None,
) -> tuple[dict[str, Any], SplitResult]:
  """Scores `model` on `split` at native resolution -> (summary, per-image result).

  Each image's row goes to `write_row` when it is scored (a classifier's validation pass,
  for its threshold and temperature, runs first so that rows are final when written).

  Args:
    config: the run's config.
    model: the trained model (eval mode), or a fold ensemble of them.
    split: the split to score; a classifier's threshold comes from 'validation'.
    get_source: split name -> random-access source (the run's, cropped as in training).
    batch_size: images per forward pass (0: the run's eval_batch_size).
    show_progress: progress bars on stderr.
  """
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy: we set batch sizes
  config.eval_batch_size = batch_size or int(config.eval_batch_size)
  config.data.num_workers = 0
  if isinstance(model, ensemble.Ensemble):  # a fold ensemble (ensemble_eval.restore)
    inference = model
  else:
    inference = Inference(config, model, batch_size=config.eval_batch_size, attention=True)
  validation, calibrate, temperature = None, None, 1.0
  if inference.classifies:
    validation = predict_split(
      inference,
      config,
      get_source("validation"),
      native=False,
      show_progress=show_progress,
      label="threshold on validation",
    )
    # Temperature scaling, fitted on validation: calibrates p(abnormal), AUC unchanged.
    temperature = classification_stats.fit_temperature(validation.labels, validation.probs)

    def calibrate(p: float) -> float:
      return float(classification_stats.apply_temperature(np.asarray([p]), temperature)[0])

  result = predict_split(
    inference,
    config,
    get_source(split),
    show_progress=show_progress,
    label=f"evaluate {split}",
    write_row=write_row,
    calibrate=calibrate,
  )
  summary: dict[str, Any] = {
    "split": split,
    "model": config.model.name,
    "dataset": config.data.name,
    "image_size": int(config.data.image_size),
    "num_images": len(result.rows),
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  for head in inference.heads:
    if head.task == "segmentation":
      summary[head.task] = split_summaries.segmentation_summary(result.rows, config)
      summary[head.task]["quality"] = split_summaries.quality_summary(
        result.rows, inference.qc_threshold
      )
    elif head.task == "classification":
      summary[head.task] = split_summaries.classification_summary(
        result, validation, split, config, temperature
      )
  summary.update(task_scores.summaries([h.task for h in inference.heads], result.rows, config))
  return summary, result
