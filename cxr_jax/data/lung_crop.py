"""Segment, crop to the lungs, classify: the workflow the archive was made for.

With `config.data.crop_to_lungs`, a trained segmentation run (`config.data.crop_workdir`)
predicts each image's lungs once; the box around them, grown by `config.data.crop_margin` on
each side, crops image and mask before the usual letterbox. Boxes are computed at native resolution and cached in the
classifier's workdir (`lung_boxes_<split>.json`), so a resumed run and `cxr_jax.evaluate`
crop exactly the same way.
"""

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from cxr_jax.data import preprocess

Box = tuple[int, int, int, int]  # top, left, bottom, right (exclusive), native pixels


def _image_id(record: Mapping[str, Any]) -> str:
  value = record["id"]
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


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


def compute_lung_boxes(seg_workdir: str, source: Sequence[Mapping[str, Any]], *,
                       batch_size: int = 16, which: str = "best") -> dict[str, Box | None]:
  """Predicted lung boxes (native pixels) of every image of `source`, keyed by id.

  The two largest predicted components (the lungs) with holes filled decide the box; an
  image where the model finds no lung maps to None (it is then used uncropped).
  """
  from cxr_jax import checkpoint, postprocess, predict  # jax: not for grain workers

  try:
    seg_config, model = checkpoint.restore_for_inference(seg_workdir, which)
  except FileNotFoundError:
    if which != "best":
      raise
    seg_config, model = checkpoint.restore_for_inference(seg_workdir, "latest")
  inference = predict.Inference(seg_config, model, batch_size=batch_size)
  if not inference.segments:
    raise ValueError(f"config.data.crop_workdir={seg_workdir!r} holds a "
                     f"{seg_config.model.name!r} model, which does not segment lungs.")
  size = int(seg_config.data.image_size)
  boxes: dict[str, Box | None] = {}
  progress = predict.Progress(len(source), "lung boxes")
  for start in range(0, len(source), batch_size):
    records = [source[i] for i in range(start, min(start + batch_size, len(source)))]
    prepared = [preprocess.prepare_image(r["image"][..., 0], size) for r in records]
    probs = inference(np.stack([image for image, _ in prepared])[..., None])["prob"]
    for record, (_, letterbox), prob in zip(records, prepared, probs):
      native = preprocess.unletterbox(prob, letterbox) > 0.5
      boxes[_image_id(record)] = mask_box(postprocess.clean_mask(native))
    progress.update(len(records))
  progress.close()
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
    box = self._boxes.get(_image_id(record))
    if box is not None:
      height, width = record["image"].shape[:2]
      top, left, bottom, right = grow_box(box, self._margin, height, width)
      record["image"] = record["image"][top:bottom, left:right]
      record["mask"] = record["mask"][top:bottom, left:right]
    return record


def maybe_crop(config: ml_collections.ConfigDict, split: str,
               source: Sequence[Mapping[str, Any]], workdir: str
               ) -> Sequence[Mapping[str, Any]]:
  """`source` cropped to the lungs when `config.data.crop_to_lungs`, else `source`."""
  if not config.data.get("crop_to_lungs", False):
    return source
  seg_workdir = config.data.crop_workdir
  if not seg_workdir:
    raise ValueError("config.data.crop_to_lungs needs --config.data.crop_workdir=DIR, the "
                     "workdir of a trained segmentation run (configs/unet.py).")
  if not os.path.exists(os.path.join(seg_workdir, "config.json")):
    raise FileNotFoundError(
        f"config.data.crop_workdir={seg_workdir!r} is not a training workdir (no "
        "config.json): train a segmentation model first, e.g. python -m cxr_jax.main "
        "--config=configs/unet.py --workdir=DIR, and pass that DIR.")
  cache = os.path.join(workdir, f"lung_boxes_{split}.json")
  if os.path.exists(cache):
    with open(cache) as f:
      record = json.load(f)
    boxes = {k: (tuple(v) if v else None) for k, v in record["boxes"].items()}
  else:
    boxes = compute_lung_boxes(seg_workdir, source)
    os.makedirs(workdir, exist_ok=True)
    with open(cache + ".tmp", "w") as f:
      json.dump({"seg_workdir": os.path.abspath(seg_workdir), "boxes": boxes}, f)
    os.replace(cache + ".tmp", cache)  # never a half-written cache
  missing = sum(box is None for box in boxes.values())
  logging.info("Lung crops for %s: %d images, %d without a predicted lung (kept whole).",
               split, len(boxes), missing)
  return CroppedSource(source, boxes, float(config.data.crop_margin))
