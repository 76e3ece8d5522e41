"""`python -m cxr_jax.predict --workdir=DIR --input=PATH --output=OUT [--checkpoint=best]`

PATH is an image or a folder of PNG/JPEG/DICOM files (top level only) of any size, 8 or 16
bit, grey or colour, decoded as the dataset decodes its files (DICOM: windowed as its header
says). Writes OUT/masks/<stem>.png
(uint8 0/255 at the input's own height and width), OUT/overlays/<stem>.png and
OUT/predictions.csv, one row per image:

    image, height, width    the file's name and native size
    lung_fraction           fraction of the image's pixels in the raw predicted mask
                            (`inference.native_mask`), as in evaluate's CSV
    lung_fraction_post      only when the run's config.postprocess: the same of the
                            post-processed mask, which is then the mask written to masks/
    pixel_spacing_mm,       only when an input is DICOM with a pixel spacing: the spacing
    lung_area_cm2           and the written mask's area
    uncertainty, flagged    segmenters: the mask's `inference.uncertainty` (mean boundary
                            entropy, TTA-averaged under config.tta) and 1 where it exceeds
                            `inference.QC_THRESHOLD` (config.qc_threshold): a mask worth checking by eye
    p_abnormal              only when the model classifies
    p_abnormal_calibrated   and DIR/calibration.json (written by evaluate for this
                            checkpoint) holds a temperature fitted on validation

A run trained on lung crops is fed lung crops here too (its config.data.crop_workdir
segments first); its masks are then the segmenter's lungs. A file that cannot be read is
named on stderr, the others still get predictions, and the exit status is 1.
"""

import io
import json
import os
import sys
from collections.abc import Iterable, Sequence

import ml_collections
import numpy as np
from absl import app
from absl import flags
from etils import epath
from flax import nnx
from PIL import Image

from cxr_jax import cli
from cxr_jax.core.inference import overlays
from cxr_jax.core.inference import portable
from cxr_jax.core.inference.inference import Inference
from cxr_jax.core.inference.inference import predict_images
from cxr_jax.core.run import csv_tables
from cxr_jax.core.run import rundir
from cxr_jax.core.run.progress import Progress
from cxr_jax.core.stats import classification_stats
from cxr_jax.data import dicom
from cxr_jax.data import images
from cxr_jax.data.images import IMAGE_SUFFIXES
from cxr_jax.workflows import lung_crop

# ----- reading images -----


def load_image(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float] | None]:
  """(one grey channel [H, W] uint8, pixel spacing in mm or None) of a PNG, JPEG or DICOM.

  PNG/JPEG go through `images.decode_greyscale`, the decoding the training data went
  through (16/32-bit greys stretched from their own min..max, colour to luminance), so the
  model sees here what it saw in training; DICOM through `dicom.decode_dicom` (rescaled,
  windowed as its header says, MONOCHROME1 inverted), which also gives the spacing.
  Raises ValueError naming the file when it is not a readable image.
  """
  try:
    data = epath.Path(path).read_bytes()
  except OSError as e:
    raise ValueError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e
  if dicom.is_dicom(data) or epath.Path(path).suffix.lower() in dicom.DICOM_SUFFIXES:
    try:
      return dicom.decode_dicom(data)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from e
  try:
    return images.decode_greyscale(data), None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"{path}: not a readable PNG/JPEG image ({type(e).__name__}: {e})") from e


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


def output_stems(paths: Sequence[epath.Path]) -> list[str]:
  """`<stem>` for each path; the full name where two files share a stem (a.png, a.jpg)."""
  stems = [p.stem for p in paths]
  return [p.name if stems.count(p.stem) > 1 else p.stem for p in paths]


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
  for start in range(0, len(items), size):
    yield items[start : start + size]


def predict_files(
  inference: Inference,
  paths: Sequence[epath.Path],
  output: str | os.PathLike,
  *,
  clean: bool = False,
  progress: bool = True,
  segmenter: lung_crop.Segmenter | None = None,
  margin: float = 0.0,
  temperature: float | None = None,
) -> tuple[list[dict], list[str]]:
  """Predicts each file and writes its mask and overlay; -> (CSV rows, error messages).

  Files are read one batch at a time, so a folder of any length fits in memory. With
  `segmenter` (a run trained on lung crops) each image is cropped to its lung box grown by
  `margin` first (`inference.predict_images`).
  """
  output = epath.Path(output)
  (output / "masks").mkdir(parents=True, exist_ok=True)
  (output / "overlays").mkdir(parents=True, exist_ok=True)
  stems = dict(zip(paths, output_stems(paths)))
  rows, errors = [], []
  bar = Progress(len(paths), "predict") if progress else None
  for chunk in _chunks(list(paths), inference.batch_size):
    loaded = []
    for path in chunk:
      try:
        loaded.append((path, *load_image(path)))
      except ValueError as e:
        errors.append(str(e))
    if loaded:
      batch = [image for _, image, _ in loaded]
      lungs = segmenter.predict(batch) if segmenter is not None else None
      predictions = predict_images(inference, batch, clean=clean, lungs=lungs, margin=margin)
      for (path, image, spacing), pred in zip(loaded, predictions):
        row = {
          "image": path.name,
          "height": pred.height,
          "width": pred.width,
          "lung_fraction": "",
          "lung_fraction_post": "",
        }
        if pred.mask is not None:
          row["lung_fraction"] = f"{pred.mask.mean():.6f}"
          if pred.mask_post is not None:
            row["lung_fraction_post"] = f"{pred.mask_post.mean():.6f}"
          mask = pred.output_mask
          _save_png(mask.astype(np.uint8) * 255, output / "masks" / f"{stems[path]}.png")
          _save_png(overlays.overlay(image, mask), output / "overlays" / f"{stems[path]}.png")
          if pred.uncertainty is not None:  # None: the lungs of a lung-crop run's segmenter
            row["uncertainty"] = f"{pred.uncertainty:.6f}"
            row["flagged"] = int(pred.uncertainty > inference.qc_threshold)
          if spacing is not None:  # DICOM: the written mask's area in cm^2
            row["pixel_spacing_mm"] = f"{spacing[0]:.4f}x{spacing[1]:.4f}"
            row["lung_area_cm2"] = f"{mask.sum() * spacing[0] * spacing[1] / 100:.3f}"
        if pred.p_abnormal is not None:
          row["p_abnormal"] = f"{pred.p_abnormal:.6f}"
          if temperature is not None:
            p = classification_stats.apply_temperature(np.array([pred.p_abnormal]), temperature)
            row["p_abnormal_calibrated"] = f"{float(p[0]):.6f}"
        rows.append(row)
    if bar:
      bar.update(len(chunk), chunk[-1].name)
  if bar:
    bar.close()
  return rows, errors


def _save_png(array: np.ndarray, path: epath.Path) -> None:
  # compress_level 1: zlib's default level took 86% of predict's time (noisy native-size
  # overlays), for files only ~5% smaller (42.6 vs 44.7 MB for 48).
  data = io.BytesIO()
  Image.fromarray(array).save(data, format="PNG", compress_level=1)
  path.write_bytes(data.getvalue())  # a local path or a gs:// URL


def write_predictions_csv(
  rows: Sequence[dict], path: str | os.PathLike, classifies: bool, postprocessed: bool = False
) -> None:
  """predictions.csv, one row per image (columns: see the module docstring)."""
  with_spacing = any("lung_area_cm2" in row for row in rows)
  segments = any("uncertainty" in row for row in rows)
  fields = (
    ["image", "height", "width", "lung_fraction"]
    + (["lung_fraction_post"] if postprocessed else [])
    + (["pixel_spacing_mm", "lung_area_cm2"] if with_spacing else [])
    + (["uncertainty", "flagged"] if segments else [])
    + (["p_abnormal"] if classifies else [])
    + (["p_abnormal_calibrated"] if any("p_abnormal_calibrated" in r for r in rows) else [])
  )
  csv_tables.write_csv(path, fields, rows)


def run(
  workdir: str,
  input_path: str,
  output: str,
  *,
  checkpoint: str = "latest",
  batch_size: int = 0,
  progress: bool = True,
  restored: tuple[ml_collections.ConfigDict, nnx.Module] | None = None,
  model_file: str = "",
  space: int = 0,
) -> int:
  """The command: predicts `input_path` into `output`; returns the exit status (0: all ok).

  `model_file` (a `python -m cxr_jax.export` file) replaces the workdir; `restored`
  ((config, model), e.g. from a test) skips reading the workdir's checkpoint; `space` > 0
  splits each image's height over that many devices (default: the run's config.mesh.space).
  """
  if epath.Path(output).exists() and not epath.Path(output).is_dir():
    print(
      f"predict: --output={output} is a file; give a folder (it is created if missing).",
      file=sys.stderr,
    )
    return 2
  paths, skipped = list_inputs(input_path)
  for path in skipped:
    print(f"predict: skipping {path.name}: not a PNG/JPEG/DICOM file", file=sys.stderr)
  if not paths:
    print(f"predict: no PNG/JPEG/DICOM files in {input_path}", file=sys.stderr)
    return 1
  segmenter, margin, temperature = None, 0.0, None
  if model_file:
    inference = portable.PortableModel(model_file, batch_size=batch_size)
    inference.batch_size = min(inference.batch_size, len(paths))
    clean = inference.settings["postprocess"]
  else:
    if restored is None:
      config, model, step = rundir.restore_model(workdir, checkpoint)
      temperature = read_temperature(workdir, step)
    else:
      config, model = restored
    config = rundir.with_space(config, space)
    batch_size = min(batch_size or int(config.get("eval_batch_size", 8)), len(paths))
    inference = Inference(config, model, batch_size=batch_size)
    clean = bool(config.get("postprocess", False))
  if not model_file and config.data.get("crop_to_lungs", False):  # trained on lung crops
    segmenter = lung_crop.load_segmenter(config.data.crop_workdir, batch_size=batch_size)
    margin = float(config.data.crop_margin)
  rows, errors = predict_files(
    inference,
    paths,
    output,
    clean=clean,
    progress=progress,
    segmenter=segmenter,
    margin=margin,
    temperature=temperature if inference.classifies else None,
  )
  write_predictions_csv(
    rows,
    epath.Path(output) / "predictions.csv",
    inference.classifies,
    postprocessed=clean and (inference.segments or segmenter is not None),
  )
  for message in errors:
    print(f"predict: error: {message}", file=sys.stderr)
  print(
    f"predict: {len(rows)} of {len(paths)} images predicted into {output}"
    + (f"; {len(errors)} failed (listed above)" if errors else ""),
    file=sys.stderr,
  )
  return 1 if errors else 0


def read_temperature(workdir: str, step: int) -> float | None:
  """The temperature evaluate fitted for checkpoint `step` (DIR/calibration.json), or None
  (not evaluated yet, or fitted for another checkpoint: then said on stderr)."""
  path = epath.Path(workdir) / rundir.CALIBRATION_FILE
  if not path.exists():
    return None
  record = json.loads(path.read_text())
  if record.get("step") != step:
    print(
      f"predict: {path} was fitted for step {record.get('step')}, not {step}: no "
      "p_abnormal_calibrated (run evaluate on this checkpoint to fit it).",
      file=sys.stderr,
    )
    return None
  return float(record["temperature"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  args = flags.FLAGS
  if bool(args.workdir) == bool(args.model):
    raise app.UsageError("Give one of --workdir (a training run) or --model (an exported file).")
  status = run(
    args.workdir,
    args.input,
    args.output,
    checkpoint=args.checkpoint,
    batch_size=args.batch_size,
    model_file=args.model or "",
    space=args.space,
  )
  sys.exit(status)


def define_flags() -> None:
  """The command's flags; defined only when run as a command, so importing is side-free."""
  flags.DEFINE_string("workdir", None, "Training workdir (config.json, checkpoints).")
  flags.DEFINE_string(
    "model",
    None,
    "A portable model (python -m cxr_jax.export), instead of "
    "--workdir: needs neither the run directory nor the model code.",
  )
  flags.DEFINE_string("input", None, "An image, or a folder of PNG/JPEG/DICOM images.")
  flags.DEFINE_string("output", None, "Folder for masks/, overlays/, predictions.csv.")
  flags.DEFINE_enum(
    "checkpoint", "latest", rundir.CHECKPOINT_CHOICES, "Which checkpoint of the workdir to use."
  )
  flags.DEFINE_integer(
    "batch_size", 0, "Images per forward pass (0: the run's eval_batch_size).", lower_bound=0
  )
  flags.DEFINE_integer(
    "space",
    0,
    "Devices of this host that split each image's height (config.mesh.space; 0: as trained).",
    lower_bound=0,
  )
  flags.mark_flags_as_required(["input", "output"])


if __name__ == "__main__":
  define_flags()
  cli.run(main)
