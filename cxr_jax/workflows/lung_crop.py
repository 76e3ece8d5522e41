"""Segment, crop to the lungs, classify: the workflow the archive was made for.

With `config.data.crop_to_lungs`, a trained segmentation run (`config.data.crop_workdir`)
predicts each image's lungs once; the box around them, grown by `config.data.crop_margin`,
crops image and mask before the usual letterbox. Boxes are computed at native resolution
and cached in the classifier's workdir (`lung_boxes_<split>.json`, recording the segmenter
workdir and step: a cache from another segmenter is recomputed), so a resumed run,
evaluation and prediction crop the same way. Multi-host: process 0 writes the cache, every
process then reads it (the workdir is on a filesystem all hosts share, as checkpoints need).
"""

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from cxr_jax.core.inference import inference as inference_lib
from cxr_jax.core.run import checkpoint
from cxr_jax.core.run import multihost
from cxr_jax.core.run import rundir
from cxr_jax.core.run.layout import RunDir
from cxr_jax.core.run.progress import Progress
from cxr_jax.data import crops
from cxr_jax.data import paths
from cxr_jax.data import records

SEGMENTER_CHECKPOINT = "best_or_latest"  # the segmentation run's checkpoint used


@dataclasses.dataclass
class Segmenter:
  """A segmentation run's model, predicting lungs and lung boxes of native images."""

  inference: inference_lib.Inference  # of a segmenting model
  workdir: str  # absolute
  step: int

  def predict(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, crops.Box | None]]:
    """Native grey images [H, W] -> (raw lung mask bool [H, W], lung box or None) each.

    The box is that of the post-processed mask (the two largest components, holes filled:
    the lungs, without stray specks). An image without a predicted lung gets None (it is
    then used uncropped).
    """
    results = []
    for start in range(0, len(images), self.inference.batch_size):
      chunk = [np.asarray(image) for image in images[start : start + self.inference.batch_size]]
      chunk = [image[..., 0] if image.ndim == 3 else image for image in chunk]
      for found in inference_lib.predict_images(self.inference, chunk, clean=True):
        results.append((found.mask, crops.mask_box(found.mask_post)))
    return results


def _check_segmentation_workdir(seg_workdir: str) -> None:
  if not seg_workdir:
    raise ValueError(
      "config.data.crop_to_lungs needs --config.data.crop_workdir=DIR, the "
      "workdir of a trained segmentation run (configs/unet.py)."
    )
  if not RunDir(seg_workdir).config.exists():
    raise FileNotFoundError(
      f"config.data.crop_workdir={seg_workdir!r} is not a training workdir (no "
      "config.json): train a segmentation model first, e.g. python -m cxr_jax.main "
      "--config=configs/unet.py --workdir=DIR, and pass that DIR."
    )


def segmenter_step(seg_workdir: str) -> int:
  """The checkpoint step `load_segmenter(seg_workdir)` restores."""
  _check_segmentation_workdir(seg_workdir)
  manager = checkpoint.create_manager(seg_workdir, rundir.load_config(seg_workdir), read_only=True)
  try:
    return rundir.select_step(manager, SEGMENTER_CHECKPOINT)
  except FileNotFoundError as e:
    raise FileNotFoundError(
      f"config.data.crop_workdir={seg_workdir!r}: {e} Train the segmentation run first."
    ) from e


def load_segmenter(seg_workdir: str, *, batch_size: int = 16) -> Segmenter:
  """Restores `seg_workdir`'s segmentation model (best checkpoint, else the latest)."""
  _check_segmentation_workdir(seg_workdir)
  seg_config, model, step = rundir.restore_model(seg_workdir, SEGMENTER_CHECKPOINT)
  inference = inference_lib.Inference(seg_config, model, batch_size=batch_size)
  if not inference.segments:
    raise ValueError(
      f"config.data.crop_workdir={seg_workdir!r} holds a "
      f"{seg_config.model.name!r} model, which does not segment lungs."
    )
  return Segmenter(inference, paths.resolve(seg_workdir), step)


def compute_lung_boxes(
  segmenter: Segmenter, source: Sequence[Mapping[str, Any]], *, show_progress: bool = True
) -> dict[str, crops.Box | None]:
  """Predicted lung boxes (native pixels) of every image of `source`, keyed by id."""
  batch_size = segmenter.inference.batch_size
  boxes: dict[str, crops.Box | None] = {}
  bar = Progress(len(source), "lung boxes") if show_progress else None
  for start in range(0, len(source), batch_size):
    chunk = [source[i] for i in range(start, min(start + batch_size, len(source)))]
    for record, (_, box) in zip(chunk, segmenter.predict([r["image"] for r in chunk])):
      boxes[records.decode_id(record["id"])] = box
    if bar:
      bar.update(len(chunk))
  if bar:
    bar.close()
  return boxes


def _stale_reason(cache: str, seg_workdir: str, step: int) -> str:
  """Why the cache cannot be used ('' when it can)."""
  if not epath.Path(cache).exists():
    return "no cache yet"
  try:
    record = json.loads(epath.Path(cache).read_text())
  except (OSError, ValueError) as e:
    return f"unreadable ({e})"
  if record.get("seg_workdir") != seg_workdir:
    return f"made with segmentation workdir {record.get('seg_workdir')!r}, not {seg_workdir!r}"
  if record.get("seg_step") != step:
    return f"made with segmentation step {record.get('seg_step')!r}, not {step}"
  return ""


def maybe_crop(
  config: ml_collections.ConfigDict, split: str, source: Sequence[Mapping[str, Any]], workdir: str
) -> Sequence[Mapping[str, Any]]:
  """`source` cropped to the lungs when `config.data.crop_to_lungs`, else `source`.

  Every process must call it (it synchronises them when there are several).
  """
  if not config.data.crop_to_lungs:
    return source
  seg_workdir = config.data.crop_workdir
  _check_segmentation_workdir(seg_workdir)
  seg_workdir = paths.resolve(seg_workdir)
  cache = str(RunDir(workdir).lung_boxes(split))
  multihost.on_process_0(
    lambda: _write_box_cache(cache, seg_workdir, split, source, workdir),
    f"Process 0 failed to compute the lung boxes of {split}; its log says why.",
    barrier_name=f"lung boxes of {split} written",
  )
  stored = json.loads(epath.Path(cache).read_text())["boxes"]
  boxes = {k: (tuple(v) if v else None) for k, v in stored.items()}
  missing = sum(box is None for box in boxes.values())
  logging.info(
    "Lung crops for %s: %d images, %d without a predicted lung (kept whole).",
    split,
    len(boxes),
    missing,
  )
  return crops.CroppedSource(source, boxes, float(config.data.crop_margin))


def _write_box_cache(
  cache: str, seg_workdir: str, split: str, source: Sequence[Mapping[str, Any]], workdir: str
) -> None:
  """Computes and writes the lung boxes of `source` unless the cache is current."""
  reason = _stale_reason(cache, seg_workdir, segmenter_step(seg_workdir))
  if not reason:
    return
  logging.info("Computing lung boxes for %s (%s: %s).", split, cache, reason)
  segmenter = load_segmenter(seg_workdir, batch_size=16)
  boxes = compute_lung_boxes(segmenter, source)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  record = {
    "seg_workdir": segmenter.workdir,
    "seg_step": segmenter.step,
    "seg_checkpoint": SEGMENTER_CHECKPOINT,
    "boxes": boxes,
  }
  paths.write_text(cache, json.dumps(record))  # never a half-written cache
