"""Predicting files: PNG/JPEG/DICOM inputs read within a pixel cap, predicted a batch at a
time, each mask and overlay written whole. `python -m cxr_jax.predict` streams these batches
into its output folder (`prediction_folder`)."""

import hashlib
import io
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import jax
import numpy as np
from etils import epath
from flax import nnx
from PIL import Image

from cxr_jax.core.inference import overlays
from cxr_jax.core.inference.inference import Inference
from cxr_jax.core.inference.inference import predict_images
from cxr_jax.core.run.progress import Progress
from cxr_jax.core.stats import classification_stats
from cxr_jax.data import dicom
from cxr_jax.data import images
from cxr_jax.data.images import IMAGE_SUFFIXES
from cxr_jax.workflows import lung_crop
from cxr_jax.workflows import prediction_folder
from cxr_jax.workflows.prediction_folder import output_stems

# The largest image predict decodes (--max_pixels): 8192 x 8192, about four times a 43 cm
# detector at 0.1 mm. Predicting one such image took 0.84 GB above the process's own 0.33 GB
# (about 12.5 bytes a pixel: grey, the map back to native size, the overlay; 0.21 GB at
# 4096 x 4096), whatever the file's size; the other images of a batch add 1 byte a pixel.
MAX_PIXELS = 8192 * 8192

# ----- reading images -----


class Loaded(NamedTuple):
  """An input as the model sees it: grey [H, W] uint8, spacing (row_mm, col_mm) or None, and
  notes on what was odd (a DICOM's spacing, NaN pixels) that did not stop it."""

  image: np.ndarray
  spacing: tuple[float, float] | None
  notes: list[str]


def load_image(path: str | os.PathLike, max_pixels: int | None = MAX_PIXELS) -> Loaded:
  """A PNG, JPEG or DICOM file, its header checked before its pixels are decoded.

  PNG/JPEG go through `images.decode_greyscale`, the decoding the training data went
  through (16/32-bit greys stretched over their own range, colour to luminance, EXIF
  orientation applied), so the model sees here what it saw in training; DICOM through
  `dicom.decode_dicom` (rescaled, windowed as its header says, MONOCHROME1 inverted), which
  also gives the spacing. The file is opened, not read whole: memory follows the image's
  pixels (at most `max_pixels`), not the file's size.
  Raises ValueError naming the file when it is not a readable image or is too large.
  """
  name = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
  try:
    with epath.Path(path).open("rb") as f:
      if f.read(132)[128:132] == b"DICM" or epath.Path(path).suffix.lower() in dicom.DICOM_SUFFIXES:
        f.seek(0)
        try:
          return Loaded(*dicom.decode_dicom(f, max_pixels))
        except ValueError as e:
          raise ValueError(f"{name}: {e}") from e
      f.seek(0)
      try:
        return Loaded(images.decode_greyscale(f, max_pixels), None, [])
      except images.TooManyPixels as e:
        raise ValueError(f"{name}: {e}") from e
      except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{name}: not a readable PNG/JPEG image ({type(e).__name__}: {e})") from e
  except OSError as e:
    raise ValueError(f"{name}: cannot be read ({type(e).__name__}: {e.strerror or e})") from e


def list_inputs(path: str | os.PathLike) -> tuple[list[epath.Path], list[epath.Path]]:
  """(files to predict, other files skipped) for an image path or a folder of images."""
  path = epath.Path(path)
  if path.is_file():
    return [path], []
  if not path.is_dir():
    raise FileNotFoundError(f"--input={str(path)!r} is neither a file nor a folder.")
  files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
  suffixes = IMAGE_SUFFIXES + dicom.DICOM_SUFFIXES
  inputs = [p for p in files if p.suffix.lower() in suffixes]
  return inputs, [p for p in files if p not in inputs]


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
  for start in range(0, len(items), size):
    yield items[start : start + size]


# ----- predicting -----


class Batch(NamedTuple):
  """One batch's results: CSV rows (their files written), errors and notes (one line each)."""

  rows: list[dict]
  errors: list[str]
  notes: list[str]


def predict_batches(
  inference: Inference,
  paths: Sequence[epath.Path],
  output: str | os.PathLike,
  stems: Mapping[epath.Path, str],
  *,
  clean: bool = False,
  show_progress: bool = True,
  segmenter: lung_crop.Segmenter | None = None,
  margin: float = 0.0,
  temperature: float | None = None,
  max_pixels: int | None = MAX_PIXELS,
) -> Iterator[Batch]:
  """Predicts the files a batch at a time, writes each mask and overlay whole (as
  `masks|overlays/<stems[path]>.png`), and yields each batch's rows once they are written:
  memory holds one batch, however many files. With `segmenter` (a run trained on lung
  crops) each image is cropped to its lung box grown by `margin` first."""
  output = epath.Path(output)
  postprocessed = clean and (inference.segments or segmenter is not None)
  bar = Progress(len(paths), "predict") if show_progress else None
  for chunk in _chunks(list(paths), inference.batch_size):
    loaded, done = [], Batch([], [], [])
    for path in chunk:
      try:
        loaded.append((path, load_image(path, max_pixels)))
      except ValueError as e:
        done.errors.append(str(e))
    if loaded:
      batch = [item.image for _, item in loaded]
      lungs = segmenter.predict(batch) if segmenter is not None else None
      predictions = predict_images(inference, batch, clean=clean, lungs=lungs, margin=margin)
      for (path, item), pred in zip(loaded, predictions):
        name = prediction_folder.display_name(path)
        done.notes.extend(f"{name}: {note}" for note in item.notes)
        row = {"image": name, "height": pred.height, "width": pred.width, "lung_fraction": ""}
        if postprocessed:
          row["lung_fraction_post"] = ""
        if pred.mask is not None:
          row["lung_fraction"] = f"{pred.mask.mean():.6f}"
          if pred.mask_post is not None:
            row["lung_fraction_post"] = f"{pred.mask_post.mean():.6f}"
          mask = pred.output_mask
          file = f"{stems[path]}.png"
          _save_png(mask.astype(np.uint8) * 255, output / "masks" / file)
          _save_png(overlays.overlay(item.image, mask), output / "overlays" / file)
          row["mask"] = f"masks/{file}"
          if pred.uncertainty is not None:  # None: the lungs of a lung-crop run's segmenter
            row["uncertainty"] = f"{pred.uncertainty:.6f}"
            row["flagged"] = int(pred.uncertainty > inference.qc_threshold)
          if item.spacing is not None:  # DICOM: the written mask's area in cm^2
            row["pixel_spacing_mm"] = f"{item.spacing[0]:.4f}x{item.spacing[1]:.4f}"
            row["lung_area_cm2"] = f"{mask.sum() * item.spacing[0] * item.spacing[1] / 100:.3f}"
        if pred.p_abnormal is not None:
          row["p_abnormal"] = f"{pred.p_abnormal:.6f}"
          if temperature is not None:
            p = classification_stats.apply_temperature(np.array([pred.p_abnormal]), temperature)
            row["p_abnormal_calibrated"] = f"{float(p[0]):.6f}"
        done.rows.append(row)
    yield done
    if bar:
      bar.update(len(chunk), prediction_folder.display_name(chunk[-1]))
  if bar:
    bar.close()


def predict_files(
  inference: Inference, paths: Sequence[epath.Path], output: str | os.PathLike, **kwargs
) -> tuple[list[dict], list[str]]:
  """`predict_batches` over `paths` into `output` (masks/ and overlays/ created), collected:
  -> (CSV rows, error messages). The command streams instead (`run`)."""
  for folder in prediction_folder.FOLDERS:
    (epath.Path(output) / folder).mkdir(parents=True, exist_ok=True)
  stems = dict(zip(paths, output_stems(paths)))
  rows, errors = [], []
  for batch in predict_batches(inference, paths, output, stems, **kwargs):
    rows += batch.rows
    errors += batch.errors
  return rows, errors


def _save_png(array: np.ndarray, path: epath.Path) -> None:
  # compress_level 1: zlib's default level took 86% of predict's time (noisy native-size
  # overlays), for files only ~5% smaller (42.6 vs 44.7 MB for 48).
  data = io.BytesIO()
  Image.fromarray(array).save(data, format="PNG", compress_level=1)
  prediction_folder.write_whole(path, data.getvalue())  # a local path or a gs:// URL


def weights_hash(model: nnx.Module) -> str:
  """sha256 of a model's arrays (its weights and statistics; not its random keys)."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(nnx.state(model)):
    if hasattr(leaf, "dtype") and not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      digest.update(np.asarray(jax.device_get(leaf)).tobytes())
  return digest.hexdigest()
