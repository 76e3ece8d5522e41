"""`python -m cxr_jax.predict --workdir=DIR --input=PATH --output=OUT [--checkpoint=best]`

PATH is an image or a folder of PNG/JPEG/DICOM files (top level only) of up to --max_pixels
pixels, 8 or 16 bit, grey or colour, decoded as the dataset decodes its files (DICOM:
windowed as its header says). Writes OUT/masks/<stem>.png (uint8 0/255 at the input's own
height and width), OUT/overlays/<stem>.png and OUT/predictions.csv, one row per image:

    image, height, width    the file's name and native size
    lung_fraction           fraction of the image's pixels in the raw predicted mask
                            (`inference.native_mask`), as in evaluate's CSV
    lung_fraction_post      only when the run's config.postprocess: the same of the
                            post-processed mask, which is then the mask written to masks/
    pixel_spacing_mm,       only when an input is DICOM with a pixel spacing: the spacing
    lung_area_cm2           and the written mask's area
    uncertainty, flagged    segmenters: the mask's `inference.uncertainty` (mean boundary
                            entropy, TTA-averaged under config.tta) and 1 where it exceeds
                            config.qc_threshold: a mask worth checking by eye
    p_abnormal              only when the model classifies
    p_abnormal_calibrated   and DIR/calibration.json (written by evaluate for this
                            checkpoint) holds a temperature fitted on validation
    mask                    the image's mask, `masks/<name>.png` (`output_stems`: the stem,
                            the full name where stems clash, then ~2, ~3)
    heart_fraction, clavicles_fraction, cardiothoracic_ratio
                            only when the model segments structures (config.model.structures;
                            their masks in OUT/masks_heart/, OUT/masks_clavicles/): the ratio
                            is the widest heart width over the widest thorax (lungs) width
    p_<finding>             only when the model predicts findings (config.model.findings)

A run trained on lung crops is fed lung crops here too (its config.data.crop_workdir
segments first); its masks are then the segmenter's lungs. A file that cannot be read, or
whose header declares more than --max_pixels pixels (checked before decoding), is named on
stderr, the others still get predictions, and the exit status is 1.

OUT is locked while predict writes into it, holds one model's results (OUT/predict.json),
and gets each file whole (a temporary name, then renamed); rows reach predictions.csv as
images finish, so Ctrl-C, a kill or a full disk keep what was done and the same command
resumes with the rest (`prediction_folder`).
"""

import errno
import os
import signal
import sys

import ml_collections
from absl import app
from absl import flags
from etils import epath
from flax import nnx
from PIL import Image

from cxr_jax import cli
from cxr_jax.core.run import csv_tables
from cxr_jax.core.run import rundir
from cxr_jax.workflows import prediction
from cxr_jax.workflows import prediction_folder
from cxr_jax.workflows import prediction_model
from cxr_jax.workflows import task_scores
from cxr_jax.workflows.prediction import MAX_PIXELS
from cxr_jax.workflows.prediction_folder import output_stems

CSV_COLUMNS = (
  "image", "height", "width", "lung_fraction", "lung_fraction_post", "pixel_spacing_mm",
  "lung_area_cm2", "uncertainty", "flagged", "p_abnormal", "p_abnormal_calibrated", "mask",
)  # fmt: skip

# ----- the command -----


def run(
  workdir: str,
  input_path: str,
  output: str,
  *,
  checkpoint: str = "latest",
  batch_size: int = 0,
  show_progress: bool = True,
  model_file: str = "",
  space: int = 0,
  max_pixels: int = MAX_PIXELS,
) -> int:
  """The command: predicts `input_path` into `output`; returns the exit status (0: all ok,
  1: some files failed or the disk filled, 2: refused, 130: stopped by Ctrl-C or SIGTERM).

  `model_file` (a `python -m cxr_jax.export` file) replaces the workdir; `space` > 0 splits
  each image's height over that many devices (default: the run's config.mesh.space); images
  over `max_pixels` pixels are refused from their header.
  """
  return _run(
    workdir,
    input_path,
    output,
    checkpoint=checkpoint,
    batch_size=batch_size,
    show_progress=show_progress,
    model_file=model_file,
    space=space,
    max_pixels=max_pixels,
  )


def run_model(
  config: ml_collections.ConfigDict,
  model: nnx.Module,
  input_path: str,
  output: str,
  *,
  batch_size: int = 0,
  show_progress: bool = True,
  max_pixels: int = MAX_PIXELS,
) -> int:
  """`run` with a model held in memory (a notebook's, a test's) and its config, instead of a
  run directory's checkpoint (so no calibration temperature)."""
  return _run(
    "",
    input_path,
    output,
    batch_size=batch_size,
    show_progress=show_progress,
    restored=(config, model),
    max_pixels=max_pixels,
  )


def _run(
  workdir: str,
  input_path: str,
  output: str,
  *,
  checkpoint: str = "latest",
  batch_size: int = 0,
  show_progress: bool = True,
  restored: tuple[ml_collections.ConfigDict, nnx.Module] | None = None,
  model_file: str = "",
  space: int = 0,
  max_pixels: int = MAX_PIXELS,
) -> int:
  if epath.Path(output).exists() and not epath.Path(output).is_dir():
    print(
      f"predict: --output={output} is a file; give a folder (it is created if missing).",
      file=sys.stderr,
    )
    return 2
  paths, skipped = prediction.list_inputs(input_path)
  for path in skipped:
    name = prediction_folder.display_name(path)
    print(f"predict: skipping {name}: not a PNG/JPEG/DICOM file", file=sys.stderr)
  if not paths:
    print(f"predict: no PNG/JPEG/DICOM files in {input_path}", file=sys.stderr)
    return 1
  try:
    model = prediction_model.load(
      workdir, checkpoint, batch_size, restored, model_file, space, len(paths)
    )
    identity = {**model.identity, "input": _absolute(input_path)}
    columns = [*CSV_COLUMNS, *task_scores.prediction_fields(model.config)]
    folder = prediction_folder.PredictionFolder.open(output, identity, model.describe, columns)
  except (ValueError, RuntimeError) as e:  # a bad model file or calibration; OUT in use
    print(f"predict: error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    if not _disk_full(e):
      raise
    print(f"predict: the disk is full ({e}); free space and rerun.", file=sys.stderr)
    return 1
  keys = [csv_tables.cell(prediction_folder.display_name(p)) for p in paths]
  todo = [p for p, key in zip(paths, keys) if key not in folder.done]
  if len(todo) < len(paths):
    print(
      f"predict: resuming: {len(paths) - len(todo)} of {len(paths)} images are done in "
      f"{output} (same model), {len(todo)} to go",
      file=sys.stderr,
    )
  stems = dict(zip(todo, output_stems(todo, taken=folder.taken_names())))
  predicted, errors, notes = 0, [], []
  batches = prediction.predict_batches(
    model.inference,
    todo,
    output,
    stems,
    clean=model.clean,
    show_progress=show_progress,
    segmenter=model.segmenter,
    margin=model.margin,
    temperature=model.temperature,
    max_pixels=max_pixels,
  )
  stopped = ""
  try:
    with folder:
      for batch in batches:
        folder.add(batch.rows)
        predicted += len(batch.rows)
        errors += batch.errors
        notes += batch.notes
  except KeyboardInterrupt:
    stopped = "stopped (Ctrl-C or SIGTERM)"
  except OSError as e:
    if not _disk_full(e):
      raise
    stopped = f"the disk is full ({e.strerror or e}{f': {e.filename}' if e.filename else ''})"
  for message in notes:
    print(f"predict: warning: {message}", file=sys.stderr)
  for message in errors:
    print(f"predict: error: {message}", file=sys.stderr)
  done = len(paths) - len(todo) + predicted
  csv_path = epath.Path(output) / prediction_folder.CSV_FILE
  if stopped:
    print(
      f"predict: {stopped} after {done} of {len(paths)} images; their masks and rows are in "
      f"{csv_path}. {'Free space and rerun' if 'disk' in stopped else 'Rerun'} the same "
      "command: it skips them and predicts the rest.",
      file=sys.stderr,
    )
    return 130 if "SIGTERM" in stopped else 1
  print(
    f"predict: {done} of {len(paths)} images predicted into {output}"
    + (f"; {len(errors)} failed (listed above)" if errors else ""),
    file=sys.stderr,
  )
  return 1 if errors else 0


def _disk_full(e: OSError) -> bool:
  return e.errno in (errno.ENOSPC, errno.EDQUOT) or cli.disk_full(e)


def _absolute(path: str) -> str:
  return path if "://" in path else os.path.abspath(path)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  # --max_pixels is the one cap (checked from each header); SIGTERM (a cluster's stop) ends
  # like Ctrl-C: the finished rows kept, the rerun resuming.
  Image.MAX_IMAGE_PIXELS = None
  signal.signal(signal.SIGTERM, signal.default_int_handler)
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
    max_pixels=args.max_pixels,
  )
  sys.exit(status)


def define_flags() -> None:
  """The command's flags; defined only when run as a command, so importing is side-free."""
  flags.DEFINE_string(
    "workdir",
    None,
    "Training workdir (config.json, checkpoints); DIR1,DIR2,... or a folder of runs (a "
    "sweep's variant: its folds) predicts with their mean (a fold ensemble).",
  )
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
  flags.DEFINE_integer(
    "max_pixels",
    MAX_PIXELS,
    "The largest image (height x width) predict decodes; larger ones are refused from their "
    "header, so memory follows this cap, not the files' sizes.",
    lower_bound=1,
  )
  flags.mark_flags_as_required(["input", "output"])


if __name__ == "__main__":
  define_flags()
  cli.run(main)
