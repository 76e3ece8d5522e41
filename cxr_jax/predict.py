"""Masks, overlays and a CSV for any chest X-ray files, from a trained workdir.

    python -m cxr_jax.predict --workdir=DIR --input=PATH --output=OUT [--checkpoint=best]

PATH is an image or a folder of PNG/JPEG files (top level only) of any size, 8 or 16 bit,
grey or colour, decoded exactly as the dataset decodes its files
(`kaggle_archive.decode_greyscale`). Writes OUT/masks/<stem>.png (uint8 0/255 at the input's
own height and width), OUT/overlays/<stem>.png and OUT/predictions.csv, one row per image:

    image, height, width    the file's name and native size
    lung_fraction           fraction of the image's pixels in the raw predicted mask
                            (p(lung) >= MASK_THRESHOLD at the native size; `native_mask`),
                            the same definition as evaluate's CSV
    lung_fraction_post      only when the run's config.postprocess: the same of the
                            post-processed mask (two largest components, holes filled),
                            which is then the mask written to masks/
    p_abnormal              only when the model classifies

A run trained on lung crops (config.data.crop_to_lungs) is fed lung crops here too: the
segmentation run of config.data.crop_workdir predicts each image's lungs, the box around them
(grown by config.data.crop_margin, as in training: `lung_crop`) is cropped and classified.
Its masks/, overlays and lung_fraction are then those lungs (the segmenter's mask, at the
native size); p_abnormal is the crop classifier's. A file that cannot be read is reported by
name on stderr, the others still get predictions, and the exit status is 1. Needs only the
workdir (config.json and checkpoints; for a crop classifier also its crop_workdir): no
dataset, no accelerator.

`Inference` (batched, jitted forward pass at the model's resolution) and `Progress` are
shared with `evaluate`.
"""

from collections.abc import Iterable, Sequence
import csv
import dataclasses
import inspect
import os
import pathlib
import sys
import time
from typing import Any, TextIO

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from cxr_jax import postprocess
from cxr_jax import quiet_logs
from cxr_jax.data import kaggle_archive
from cxr_jax.data import preprocess

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_THRESHOLD = 0.5  # on the probability, after mapping it back to the native size


# ----- reading images -----

def load_grey(path: str | os.PathLike) -> np.ndarray:
  """Reads a PNG/JPEG as one grey channel [H, W] uint8, exactly as the dataset decodes it.

  `kaggle_archive.decode_greyscale`, the decoding the training data went through: 16/32-bit
  greys stretched from their own min..max to 0..255, colour, palette and alpha images
  converted to luminance. So the model sees here what it saw in training. Raises ValueError
  naming the file when it is not a readable image.
  """
  try:
    data = pathlib.Path(path).read_bytes()
  except OSError as e:
    raise ValueError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e
  try:
    return kaggle_archive.decode_greyscale(data)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"{path}: not a readable PNG/JPEG image ({type(e).__name__}: {e})") from e


def list_inputs(path: str | os.PathLike) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
  """(files to predict, other files skipped) for an image path or a folder of images."""
  path = pathlib.Path(path)
  if path.is_file():
    return [path], []
  if not path.is_dir():
    raise FileNotFoundError(f"--input={str(path)!r} is neither a file nor a folder.")
  files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
  images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
  return images, [p for p in files if p not in images]


def output_stems(paths: Sequence[pathlib.Path]) -> list[str]:
  """`<stem>` for each path; the full name where two files share a stem (a.png, a.jpg)."""
  stems = [p.stem for p in paths]
  return [p.name if stems.count(p.stem) > 1 else p.stem for p in paths]


# ----- the model -----

class Inference:
  """A restored model's jitted forward pass on letterboxed batches of fixed size.

  `__call__(images [B, S, S, 1] float32)` (B <= batch_size; padded inside so one shape is
  compiled) -> dict of numpy arrays: 'prob' [B, S, S] lung probability (segmenters),
  'p_abnormal' [B] (classifiers), 'attention' list of [B, s, s] gate maps (Attention U-Net,
  when `attention=True`).
  """

  def __init__(self, config: ml_collections.ConfigDict, model: nnx.Module, *,
               batch_size: int, attention: bool = False):
    self.config = config
    self.image_size = int(config.data.image_size)
    self.batch_size = batch_size
    call_params = inspect.signature(type(model).__call__).parameters
    self.has_attention = "return_attention" in call_params
    kwargs = {"return_attention": True} if (attention and self.has_attention) else {}
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, images):
      outputs = nnx.merge(graphdef, state)(images, train=False, **kwargs)
      result = {}
      if "mask_logits" in outputs:
        result["prob"] = jax.nn.sigmoid(outputs["mask_logits"][..., 0])
      if "class_logits" in outputs:
        logits = outputs["class_logits"]
        result["p_abnormal"] = (jax.nn.sigmoid(logits[:, 0]) if logits.shape[-1] == 1
                                else jax.nn.softmax(logits, -1)[:, 1])
      if "attention" in outputs:
        result["attention"] = [a[..., 0] for a in outputs["attention"]]
      return result

    self._state = state
    self._forward = forward
    probe = jax.eval_shape(forward, state, jax.ShapeDtypeStruct(
        (1, self.image_size, self.image_size, 1), np.float32))
    self.segments = "prob" in probe
    self.classifies = "p_abnormal" in probe

  def __call__(self, images: np.ndarray) -> dict:
    images = np.asarray(images, np.float32)
    count = images.shape[0]
    if count > self.batch_size:
      raise ValueError(f"batch of {count} > batch_size {self.batch_size}")
    padded = np.zeros((self.batch_size,) + images.shape[1:], np.float32)
    padded[:count] = images
    outputs = jax.device_get(self._forward(self._state, padded))
    return jax.tree.map(lambda x: np.asarray(x)[:count], outputs)


# ----- progress -----

class Progress:
  """A one-line progress bar on stderr (or a line per ~10% when stderr is not a terminal)."""

  def __init__(self, total: int, desc: str, stream: TextIO | None = None, width: int = 30):
    self.total, self.desc, self.width = max(total, 0), desc, width
    self.stream = stream or sys.stderr
    self.count = 0
    self.start = time.monotonic()
    self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self._last_tenth = -1

  def update(self, n: int = 1, note: str = "") -> None:
    self.count += n
    done = self.count / self.total if self.total else 1.0
    elapsed = time.monotonic() - self.start
    eta = elapsed / self.count * (self.total - self.count) if self.count else 0.0
    filled = int(round(done * self.width))
    line = (f"{self.desc} [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{self.count}/{self.total} {elapsed:.0f}s elapsed, ~{eta:.0f}s left")
    if self._tty:
      self.stream.write(f"\r{line} {note[:40]:<40}")
      self.stream.flush()
    elif int(done * 10) > self._last_tenth:
      self._last_tenth = int(done * 10)
      self.stream.write(line + "\n")
      self.stream.flush()

  def close(self) -> None:
    if self._tty:
      self.stream.write("\n")
      self.stream.flush()


# ----- predicting files -----

def native_mask(prob: np.ndarray, letterbox: preprocess.Letterbox, *,
                clean: bool) -> np.ndarray:
  """A segmenter's p(lung) [S, S] (letterboxed) -> the mask at the native size, bool [H, W].

  The one mapping from model output to a native mask (predict, evaluate and lung_crop all
  use it): bilinear `unletterbox` of the probability, then `>= MASK_THRESHOLD`; clean=True
  then applies `postprocess.clean_mask` (two largest components, holes filled), i.e.
  `native_mask(..., clean=True) == postprocess.clean_mask(native_mask(..., clean=False))`.
  """
  mask = preprocess.unletterbox(prob, letterbox, order="bilinear") >= MASK_THRESHOLD
  return postprocess.clean_mask(mask) if clean else mask


@dataclasses.dataclass
class Prediction:
  """One image's outputs at its native size."""
  height: int
  width: int
  mask: np.ndarray | None  # bool [H, W], raw (thresholded); None when nothing segments
  mask_post: np.ndarray | None  # bool [H, W], post-processed; None unless asked for
  p_abnormal: float | None
  crop: tuple[int, int, int, int] | None = None  # lung crop the classifier saw (top, left,
                                                 # bottom, right); None: the whole image

  @property
  def output_mask(self) -> np.ndarray | None:
    """The mask written to masks/: post-processed when it was asked for, else raw."""
    return self.mask_post if self.mask_post is not None else self.mask


def predict_images(inference: Inference, images: Sequence[np.ndarray], *,
                   clean: bool = False, segmenter: Any = None,
                   margin: float = 0.0) -> list[Prediction]:
  """Predicts native grey images [H, W] (one batch at most `inference.batch_size`).

  With `segmenter` (a `lung_crop.Segmenter`, for a run trained on lung crops) each image is
  first cropped to its predicted lung box grown by `margin` (`lung_crop.grow_box`), as in
  training; the mask reported is then the model's own mask pasted back into the native
  frame (multitask) or else the segmenter's lungs, the mask the crop came from.
  """
  size = inference.image_size
  crops: list[tuple[int, int, int, int] | None] = [None] * len(images)
  lungs: list[np.ndarray | None] = [None] * len(images)
  if segmenter is not None:
    from cxr_jax.data import lung_crop
    for k, (image, (raw, box)) in enumerate(zip(images, segmenter.predict(images))):
      lungs[k] = raw
      if box is not None:
        crops[k] = lung_crop.grow_box(box, margin, *image.shape[:2])
  views = [image if c is None else image[c[0]:c[2], c[1]:c[3]]
           for image, c in zip(images, crops)]
  prepared = [preprocess.prepare_image(view, size) for view in views]
  outputs = inference(np.stack([x for x, _ in prepared])[..., None])
  results = []
  for i, (image, crop, (_, box)) in enumerate(zip(images, crops, prepared)):
    height, width = image.shape[:2]
    mask = lungs[i]
    if inference.segments:
      mask = native_mask(outputs["prob"][i], box, clean=False)
      if crop is not None:  # back into the full image's frame: no lung outside the crop
        canvas = np.zeros((height, width), bool)
        canvas[crop[0]:crop[2], crop[1]:crop[3]] = mask
        mask = canvas
    mask_post = postprocess.clean_mask(mask) if (clean and mask is not None) else None
    p = float(outputs["p_abnormal"][i]) if inference.classifies else None
    results.append(Prediction(height, width, mask, mask_post, p, crop))
  return results


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
  for start in range(0, len(items), size):
    yield items[start:start + size]


def predict_files(inference: Inference, paths: Sequence[pathlib.Path],
                  output: str | os.PathLike, *, clean: bool = False,
                  progress: bool = True, segmenter: Any = None,
                  margin: float = 0.0) -> tuple[list[dict], list[str]]:
  """Predicts each file and writes its mask and overlay; -> (CSV rows, error messages).

  Files are read one batch at a time, so a folder of any length fits in memory.
  `segmenter`, `margin`: see `predict_images`.
  """
  from cxr_jax import overlays  # the metrics owner's drawing; imported late: PIL-heavy

  output = pathlib.Path(output)
  (output / "masks").mkdir(parents=True, exist_ok=True)
  (output / "overlays").mkdir(parents=True, exist_ok=True)
  stems = dict(zip(paths, output_stems(paths)))
  rows, errors = [], []
  bar = Progress(len(paths), "predict") if progress else None
  for chunk in _chunks(list(paths), inference.batch_size):
    loaded = []
    for path in chunk:
      try:
        loaded.append((path, load_grey(path)))
      except ValueError as e:
        errors.append(str(e))
    if loaded:
      predictions = predict_images(inference, [image for _, image in loaded], clean=clean,
                                   segmenter=segmenter, margin=margin)
      for (path, image), pred in zip(loaded, predictions):
        row = {"image": path.name, "height": pred.height, "width": pred.width,
               "lung_fraction": "", "lung_fraction_post": ""}
        if pred.mask is not None:
          row["lung_fraction"] = f"{pred.mask.mean():.6f}"
          if pred.mask_post is not None:
            row["lung_fraction_post"] = f"{pred.mask_post.mean():.6f}"
          mask = pred.output_mask
          Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(
              output / "masks" / f"{stems[path]}.png")
          rgb = overlays.overlay(image, mask)
          Image.fromarray(rgb).save(output / "overlays" / f"{stems[path]}.png")
        if pred.p_abnormal is not None:
          row["p_abnormal"] = f"{pred.p_abnormal:.6f}"
        rows.append(row)
    if bar:
      bar.update(len(chunk), chunk[-1].name)
  if bar:
    bar.close()
  return rows, errors


def write_csv(rows: Sequence[dict], path: str | os.PathLike, classifies: bool,
              postprocessed: bool = False) -> None:
  """predictions.csv, one row per image (columns: see the module docstring)."""
  fields = (["image", "height", "width", "lung_fraction"]
            + (["lung_fraction_post"] if postprocessed else [])
            + (["p_abnormal"] if classifies else []))
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)


def run(workdir: str, input_path: str, output: str, *, checkpoint: str = "latest",
        batch_size: int = 0, progress: bool = True,
        restored: tuple[ml_collections.ConfigDict, nnx.Module] | None = None) -> int:
  """The command: predicts `input_path` into `output`; returns the exit status (0: all ok).

  `restored` ((config, model), e.g. from a test) skips reading the workdir's checkpoint.
  """
  from cxr_jax import checkpoint as checkpoint_lib

  paths, skipped = list_inputs(input_path)
  for path in skipped:
    print(f"predict: skipping {path.name}: not a .png/.jpg/.jpeg file", file=sys.stderr)
  if not paths:
    print(f"predict: no PNG/JPEG files in {input_path}", file=sys.stderr)
    return 1
  config, model = restored or checkpoint_lib.restore_for_inference(workdir, checkpoint)
  batch_size = min(batch_size or int(config.get("eval_batch_size", 8)), len(paths))
  inference = Inference(config, model, batch_size=batch_size)
  clean = bool(config.get("postprocess", False))
  segmenter, margin = None, 0.0
  if config.data.get("crop_to_lungs", False):  # trained on lung crops: predict on them too
    from cxr_jax.data import lung_crop
    segmenter = lung_crop.load_segmenter(config.data.crop_workdir, batch_size=batch_size)
    margin = float(config.data.crop_margin)
  rows, errors = predict_files(inference, paths, output, clean=clean, progress=progress,
                               segmenter=segmenter, margin=margin)
  write_csv(rows, pathlib.Path(output) / "predictions.csv", inference.classifies,
            postprocessed=clean and (inference.segments or segmenter is not None))
  for message in errors:
    print(f"predict: error: {message}", file=sys.stderr)
  print(f"predict: {len(rows)} of {len(paths)} images predicted into {output}"
        + (f"; {len(errors)} failed (listed above)" if errors else ""), file=sys.stderr)
  return 1 if errors else 0


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  quiet_logs.install()
  f = flags.FLAGS
  sys.exit(run(f.workdir, f.input, f.output, checkpoint=f.checkpoint, batch_size=f.batch_size))


def define_flags() -> None:
  """The command's flags; defined only when run as a command, so importing is side-free."""
  flags.DEFINE_string("workdir", None, "Training workdir (config.json, checkpoints).")
  flags.DEFINE_string("input", None, "An image, or a folder of PNG/JPEG images.")
  flags.DEFINE_string("output", None, "Folder for masks/, overlays/, predictions.csv.")
  flags.DEFINE_enum("checkpoint", "latest", ["latest", "best"],
                    "Which checkpoint of the workdir to use.")
  flags.DEFINE_integer("batch_size", 0, "Images per forward pass (0: the run's "
                       "eval_batch_size).")
  flags.mark_flags_as_required(["workdir", "input", "output"])


if __name__ == "__main__":
  define_flags()
  app.run(main)
