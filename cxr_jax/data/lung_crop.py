"""Segment, crop to the lungs, classify: the workflow the archive was made for.

With `config.data.crop_to_lungs`, a trained segmentation run (`config.data.crop_workdir`)
predicts each image's lungs once; the box around them, grown by `config.data.crop_margin` on
each side, crops image and mask before the usual letterbox. Boxes are computed at native
resolution and cached in the classifier's workdir (`lung_boxes_<split>.json`, recording the
segmentation workdir and checkpoint step they came from: a cache from another segmenter is
recomputed), so a resumed run and `cxr_jax.evaluate` crop exactly the same way.
`cxr_jax.predict` crops its inputs with the same `Segmenter` and `grow_box`.

Multi-host: process 0 computes and writes the cache, every process then reads it (the
workdir must be on a filesystem all hosts share, as checkpoints need anyway).

This module is imported by grain workers (`CroppedSource` is pickled to them): jax is
imported only inside the functions that predict.
"""

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from cxr_jax.data import records

Box = tuple[int, int, int, int]  # top, left, bottom, right (exclusive), native pixels
SEGMENTER_CHECKPOINT = "best"  # the segmentation run's checkpoint used ('latest' if none)


def mask_box(mask: np.ndarray) -> Box | None:
  """Bounding box of a binary [H, W] mask; None when it is empty."""
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  if not rows.size:
    return None
  return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def grow_box(box: Box, margin: float, height: int, width: int) -> Box:
  """`box` grown by `margin` of its own height/width on each side, clipped to the image."""
  top, left, bottom, right = box
  dy, dx = round(margin * (bottom - top)), round(margin * (right - left))
  return max(0, top - dy), max(0, left - dx), min(height, bottom + dy), min(width, right + dx)


def segmenter_step(seg_workdir: str) -> int:
  """The checkpoint step `load_segmenter(seg_workdir)` restores (best, else latest)."""
  from cxr_jax import checkpoint  # jax: not for grain workers

  config = checkpoint.load_config(seg_workdir)
  manager = checkpoint.create_manager(seg_workdir, config, read_only=True)
  step = checkpoint.best_step(manager) if SEGMENTER_CHECKPOINT == "best" else None
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"config.data.crop_workdir={seg_workdir!r} has no complete "
                            "checkpoint: train the segmentation run first.")
  return int(step)


@dataclasses.dataclass
class Segmenter:
  """A segmentation run's model, predicting lungs and lung boxes of native images."""
  inference: Any  # predict.Inference of a segmenting model
  workdir: str  # absolute
  step: int

  def predict(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, Box | None]]:
    """Native grey images [H, W] -> (raw lung mask bool [H, W], lung box or None) each.

    The mask is `predict.native_mask` (raw); the box is that of its post-processed version
    (the two largest components, holes filled: the lungs, without stray specks). An image
    where the model finds no lung gets None (it is then used uncropped).
    """
    from cxr_jax import postprocess, predict  # jax: not for grain workers
    from cxr_jax.data import preprocess

    size = self.inference.image_size
    results = []
    for start in range(0, len(images), self.inference.batch_size):
      chunk = [np.asarray(image) for image in images[start:start + self.inference.batch_size]]
      chunk = [image[..., 0] if image.ndim == 3 else image for image in chunk]
      prepared = [preprocess.prepare_image(image, size) for image in chunk]
      probs = self.inference(np.stack([x for x, _ in prepared])[..., None])["prob"]
      for (_, letterbox), prob in zip(prepared, probs):
        raw = predict.native_mask(prob, letterbox, clean=False)
        results.append((raw, mask_box(postprocess.clean_mask(raw))))
    return results

  def boxes(self, images: Sequence[np.ndarray]) -> list[Box | None]:
    """The lung box of each native image (see `predict`)."""
    return [box for _, box in self.predict(images)]


def load_segmenter(seg_workdir: str, *, batch_size: int = 16) -> Segmenter:
  """Restores `seg_workdir`'s segmentation model (best checkpoint, else the latest)."""
  from cxr_jax import checkpoint, predict  # jax: not for grain workers

  if not seg_workdir:
    raise ValueError("config.data.crop_to_lungs needs --config.data.crop_workdir=DIR, the "
                     "workdir of a trained segmentation run (configs/unet.py).")
  if not os.path.exists(os.path.join(seg_workdir, "config.json")):
    raise FileNotFoundError(
        f"config.data.crop_workdir={seg_workdir!r} is not a training workdir (no "
        "config.json): train a segmentation model first, e.g. python -m cxr_jax.main "
        "--config=configs/unet.py --workdir=DIR, and pass that DIR.")
  step = segmenter_step(seg_workdir)
  try:
    seg_config, model = checkpoint.restore_for_inference(seg_workdir, SEGMENTER_CHECKPOINT)
  except FileNotFoundError:
    seg_config, model = checkpoint.restore_for_inference(seg_workdir, "latest")
  inference = predict.Inference(seg_config, model, batch_size=batch_size)
  if not inference.segments:
    raise ValueError(f"config.data.crop_workdir={seg_workdir!r} holds a "
                     f"{seg_config.model.name!r} model, which does not segment lungs.")
  return Segmenter(inference, os.path.abspath(seg_workdir), step)


def compute_lung_boxes(segmenter: Segmenter, source: Sequence[Mapping[str, Any]], *,
                       progress: bool = True) -> dict[str, Box | None]:
  """Predicted lung boxes (native pixels) of every image of `source`, keyed by id."""
  from cxr_jax import predict  # jax: not for grain workers

  batch_size = segmenter.inference.batch_size
  boxes: dict[str, Box | None] = {}
  bar = predict.Progress(len(source), "lung boxes") if progress else None
  for start in range(0, len(source), batch_size):
    chunk = [source[i] for i in range(start, min(start + batch_size, len(source)))]
    for record, box in zip(chunk, segmenter.boxes([r["image"] for r in chunk])):
      boxes[records.decode_id(record["id"])] = box
    if bar:
      bar.update(len(chunk))
  if bar:
    bar.close()
  return boxes


class CroppedSource:
  """A data source whose images (and masks) are cropped to given boxes; picklable."""

  def __init__(self, source: Sequence[Mapping[str, Any]], boxes: Mapping[str, Box | None],
               margin: float):
    self._source, self._boxes, self._margin = source, dict(boxes), margin

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = dict(self._source[index])
    box = self._boxes.get(records.decode_id(record["id"]))
    if box is not None:
      height, width = record["image"].shape[:2]
      top, left, bottom, right = grow_box(box, self._margin, height, width)
      record["image"] = record["image"][top:bottom, left:right]
      record["mask"] = record["mask"][top:bottom, left:right]
    return record


def _stale_reason(cache: str, seg_workdir: str, step: int) -> str:
  """Why the cache cannot be used ('' when it can)."""
  if not os.path.exists(cache):
    return "no cache yet"
  try:
    with open(cache) as f:
      record = json.load(f)
  except (OSError, ValueError) as e:
    return f"unreadable ({e})"
  if record.get("seg_workdir") != seg_workdir:
    return f"made with segmentation workdir {record.get('seg_workdir')!r}, not {seg_workdir!r}"
  if record.get("seg_step") != step:
    return f"made with segmentation step {record.get('seg_step')!r}, not {step}"
  return ""


def maybe_crop(config: ml_collections.ConfigDict, split: str,
               source: Sequence[Mapping[str, Any]], workdir: str
               ) -> Sequence[Mapping[str, Any]]:
  """`source` cropped to the lungs when `config.data.crop_to_lungs`, else `source`.

  Every process must call it (it synchronises them when there are several).
  """
  if not config.data.get("crop_to_lungs", False):
    return source
  import jax  # not for grain workers

  seg_workdir = config.data.crop_workdir
  if not seg_workdir or not os.path.exists(os.path.join(seg_workdir, "config.json")):
    load_segmenter(seg_workdir)  # raises the error that says what to do
  seg_workdir = os.path.abspath(seg_workdir)
  cache = os.path.join(workdir, f"lung_boxes_{split}.json")
  if jax.process_index() == 0:
    reason = _stale_reason(cache, seg_workdir, segmenter_step(seg_workdir))
    if reason:
      logging.info("Computing lung boxes for %s (%s: %s).", split, cache, reason)
      segmenter = load_segmenter(seg_workdir, batch_size=16)
      boxes = compute_lung_boxes(segmenter, source)
      os.makedirs(workdir, exist_ok=True)
      with open(cache + ".tmp", "w") as f:
        json.dump({"seg_workdir": segmenter.workdir, "seg_step": segmenter.step,
                   "seg_checkpoint": SEGMENTER_CHECKPOINT, "boxes": boxes}, f)
      os.replace(cache + ".tmp", cache)  # never a half-written cache
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"lung_boxes_{split}")
  with open(cache) as f:
    boxes = {k: (tuple(v) if v else None) for k, v in json.load(f)["boxes"].items()}
  missing = sum(box is None for box in boxes.values())
  logging.info("Lung crops for %s: %d images, %d without a predicted lung (kept whole).",
               split, len(boxes), missing)
  return CroppedSource(source, boxes, float(config.data.crop_margin))
