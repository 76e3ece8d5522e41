"""predict on awkward files: 16-bit PNG, RGB JPEG, a 3000x2500 image and a text file named
.png. A fake model (fixed rule, compiles in a second) makes the outputs checkable; one test
runs the real command on a trained smoke workdir when the trainer is available."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from cxr_jax import predict
from cxr_jax.core.inference import inference
from cxr_jax.core.inference.inference import Inference
from cxr_jax.core.run.progress import Progress
from cxr_jax.data import images
from cxr_jax.data import preprocess
from cxr_jax.workflows import prediction
from cxr_jax.workflows import prediction_model
from tests.conftest import run_module


def _config() -> ml_collections.ConfigDict:
  from configs import default

  config = default.get_config()
  config.data.image_size = 32
  config.eval_batch_size = 2
  return config


def _lungs(height: int, width: int) -> np.ndarray:
  """A dark image with two bright ellipses: float in [0, 1]."""
  rows, cols = np.mgrid[:height, :width]
  lungs = np.zeros((height, width), bool)
  for cx in (0.3, 0.7):
    lungs |= ((rows - 0.5 * height) / (0.35 * height)) ** 2 + (
      (cols - cx * width) / (0.15 * width)
    ) ** 2 <= 1
  return 0.15 + 0.7 * lungs


@pytest.fixture(scope="module")
def awkward_folder(tmp_path_factory) -> pathlib.Path:
  folder = tmp_path_factory.mktemp("inputs")
  Image.fromarray((_lungs(300, 200) * 60000).astype(np.uint16)).save(folder / "grey16.png")
  rgb = (np.stack([_lungs(150, 220)] * 3, -1) * 255).astype(np.uint8)
  rgb[..., 0] = rgb[..., 0] // 2  # a colour cast: must still become one grey channel
  Image.fromarray(rgb, mode="RGB").save(folder / "colour.jpg", quality=90)
  Image.fromarray((_lungs(3000, 2500) * 255).astype(np.uint8)).save(
    folder / "big.png", compress_level=1
  )
  (folder / "notes.png").write_text("this is not an image\n")
  (folder / "readme.txt").write_text("skipped: not a .png/.jpg\n")
  return folder


EXPECTED = {"big.png": (3000, 2500), "colour.jpg": (150, 220), "grey16.png": (300, 200)}


def _read_csv(path: pathlib.Path) -> tuple[list[str], list[dict]]:
  with open(path) as f:
    reader = csv.DictReader(f)
    return reader.fieldnames, list(reader)


def test_load_image_decodes_like_the_dataset(awkward_folder):
  deep = prediction.load_image(awkward_folder / "grey16.png")[0]
  assert deep.dtype == np.uint8 and deep.min() == 0 and deep.max() == 255  # stretched
  colour = prediction.load_image(awkward_folder / "colour.jpg")[0]
  assert colour.dtype == np.uint8 and colour.shape == (150, 220)
  with pytest.raises(ValueError, match="notes.png"):
    prediction.load_image(awkward_folder / "notes.png")[0]
  with pytest.raises(ValueError, match="missing.png"):
    prediction.load_image(awkward_folder / "missing.png")[0]


def test_16_bit_png_gives_the_model_what_training_gave_it(tmp_path):
  """predict's model input == the dataset's (the builder's decoding, then the pipeline's
  prepare_image) for a 16-bit radiograph using 12 of its bits."""
  rng = np.random.default_rng(0)
  deep = (_lungs(90, 70) * 3000 + rng.integers(0, 800, (90, 70))).astype(np.uint16)
  Image.fromarray(deep).save(tmp_path / "deep.png")
  stored = images.decode_greyscale((tmp_path / "deep.png").read_bytes())  # builder
  via_dataset, _ = preprocess.prepare_image(stored, 32)
  via_predict, _ = preprocess.prepare_image(prediction.load_image(tmp_path / "deep.png")[0], 32)
  np.testing.assert_array_equal(via_predict, via_dataset)


def test_lung_fraction_is_raw_and_post_is_reported(tmp_path, fake_model):
  """lung_fraction means the raw mask (as in evaluate); lung_fraction_post the cleaned one."""
  image = _lungs(120, 100)
  image[1:11, 44:56] = 0.85  # a bright speck: lung to the raw mask, removed by clean_mask
  Image.fromarray((image * 255).astype(np.uint8)).save(tmp_path / "speck.png")
  config = _config()
  config.postprocess = True
  out = tmp_path / "out"
  assert (
    predict.run_model(
      config,
      fake_model(),
      str(tmp_path / "speck.png"),
      str(out),
      show_progress=False,
    )
    == 0
  )
  fields, rows = _read_csv(out / "predictions.csv")
  assert fields == [
    "image",
    "height",
    "width",
    "lung_fraction",
    "lung_fraction_post",
    "uncertainty",
    "flagged",
    "mask",
  ]
  written = np.asarray(Image.open(out / "masks" / "speck.png")) > 0  # post-processed
  assert float(rows[0]["lung_fraction_post"]) == pytest.approx(written.mean(), abs=1e-5)
  assert float(rows[0]["lung_fraction"]) > float(rows[0]["lung_fraction_post"])


def test_native_mask_threshold_and_clean():
  prob = np.full((32, 32), inference.MASK_THRESHOLD, np.float32)
  _, box = preprocess.prepare_image(np.zeros((40, 50), np.uint8), 32)
  assert inference.native_mask(prob, box, clean=False).all()  # >= the threshold is lung
  assert not inference.native_mask(prob - 0.01, box, clean=True).any()


def test_folder_with_a_broken_file(awkward_folder, tmp_path, capsys, fake_model):
  status = predict.run_model(
    _config(), fake_model(), str(awkward_folder), str(tmp_path), show_progress=True
  )
  assert status == 1  # something failed ...
  err = capsys.readouterr().err
  assert "notes.png" in err and "readme.txt" in err and "3 of 4" in err
  fields, rows = _read_csv(tmp_path / "predictions.csv")
  assert fields == ["image", "height", "width", "lung_fraction", "uncertainty", "flagged", "mask"]
  assert {r["image"]: (int(r["height"]), int(r["width"])) for r in rows} == EXPECTED
  for name, shape in EXPECTED.items():  # ... the rest predicted at their native size
    stem = pathlib.Path(name).stem
    mask = np.asarray(Image.open(tmp_path / "masks" / f"{stem}.png"))
    assert mask.shape == shape and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    truth = _lungs(*shape) > 0.5
    dice = 2 * ((mask > 0) & truth).sum() / ((mask > 0).sum() + truth.sum())
    assert dice > 0.9, name
    row = next(r for r in rows if r["image"] == name)
    assert float(row["lung_fraction"]) == pytest.approx((mask > 0).mean(), abs=1e-5)
    overlay = Image.open(tmp_path / "overlays" / f"{stem}.png")
    assert overlay.size == (shape[1], shape[0]) and overlay.mode == "RGB"


def test_single_image_and_classifier_column(awkward_folder, tmp_path, fake_model):
  status = predict.run_model(
    _config(),
    fake_model(classify=True),
    str(awkward_folder / "colour.jpg"),
    str(tmp_path),
    show_progress=False,
  )
  assert status == 0
  fields, rows = _read_csv(tmp_path / "predictions.csv")
  assert fields == [
    "image",
    "height",
    "width",
    "lung_fraction",
    "uncertainty",
    "flagged",
    "p_abnormal",
    "mask",
  ]
  assert len(rows) == 1 and 0 <= float(rows[0]["p_abnormal"]) <= 1


def test_same_stem_gets_distinct_outputs():
  paths = [pathlib.Path("a.png"), pathlib.Path("a.jpg"), pathlib.Path("b.png")]
  assert predict.output_stems(paths) == ["a.png", "a.jpg", "b"]


def test_progress_bar_reaches_the_total(capsys):
  bar = Progress(4, "work")
  for _ in range(4):
    bar.update()
  bar.close()
  assert "4/4" in capsys.readouterr().err


# ----- the command, on a workdir -----


def make_random_workdir(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """A workdir like a run's (config.json, one Orbax checkpoint) holding random weights.

  The weights are drawn in numpy into the model's abstract state: initialising the real
  model compiles every initializer (about a minute on a busy 2-core CPU).
  """
  from cxr_jax.core import models
  from cxr_jax.core.run import checkpoint

  abstract = nnx.eval_shape(lambda: models.create_model(config.model, rngs=nnx.Rngs(0)))
  _, params, rest = nnx.split(abstract, nnx.Param, ...)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype), params)

  def fill(path, s):
    if jnp.issubdtype(s.dtype, jax.dtypes.prng_key):
      return jax.random.key(0)
    return (jnp.ones if "var" in jax.tree_util.keystr(path) else jnp.zeros)(s.shape, s.dtype)

  rest = jax.tree_util.tree_map_with_path(fill, rest)
  workdir.mkdir(parents=True, exist_ok=True)
  manager = checkpoint.create_manager(str(workdir), config)
  checkpoint.save(
    manager, 1, {"model": {"params": params, "rest": rest}}, None, metrics={config.best_metric: 0.5}
  )
  manager.wait_until_finished()
  (workdir / "config.json").write_text(json.dumps({"config": config.to_dict()}))


def test_command_on_a_workdir(awkward_folder, tmp_path):
  from configs import default

  config = default.get_config("smoke")
  make_random_workdir(tmp_path / "run", config)
  out = tmp_path / "out"
  done = run_module(
    "cxr_jax.predict",
    f"--workdir={tmp_path / 'run'}",
    f"--input={awkward_folder}",
    f"--output={out}",
    "--checkpoint=best",
  )
  assert done.returncode == 1, done.stderr
  assert "notes.png" in done.stderr
  _, rows = _read_csv(out / "predictions.csv")
  assert {r["image"]: (int(r["height"]), int(r["width"])) for r in rows} == EXPECTED
  for name, shape in EXPECTED.items():
    mask = Image.open(out / "masks" / f"{pathlib.Path(name).stem}.png")
    assert (mask.height, mask.width) == shape


# ----- DICOM -----


def _write_dicom(
  path: pathlib.Path,
  stored: np.ndarray,
  *,
  photometric: str,
  slope: float,
  intercept: float,
  center: float,
  width: float,
  spacing=None,
) -> None:
  """A minimal DICOM radiograph written by pydicom (16-bit, uncompressed)."""
  from pydicom.dataset import FileDataset
  from pydicom.dataset import FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian
  from pydicom.uid import generate_uid

  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Modality, ds.PhotometricInterpretation = "DX", photometric
  ds.Rows, ds.Columns = stored.shape
  ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 16, 15
  ds.PixelRepresentation = 0
  ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
  ds.WindowCenter, ds.WindowWidth = center, width
  if spacing:
    ds.PixelSpacing = list(spacing)
  ds.PixelData = stored.astype(np.uint16).tobytes()
  ds.save_as(str(path), enforce_file_format=True)


def test_dicom_is_predicted_like_its_png_twin(tmp_path, fake_model):
  """MONOCHROME2 and MONOCHROME1, 16 bit, rescaled and windowed to exactly the PNG's grey
  levels: the same masks; the spacing gives the lung area in cm^2."""
  grey = (_lungs(90, 70) * 255).round().astype(np.uint8)  # the PNG twin
  Image.fromarray(grey).save(tmp_path / "twin.png")
  g = grey.astype(np.int64)
  # Modality values 2g (stored 4g + 100, slope 0.5, intercept -50), window 0..510 -> g.
  _write_dicom(
    tmp_path / "mono2.dcm",
    4 * g + 100,
    photometric="MONOCHROME2",
    slope=0.5,
    intercept=-50,
    center=255,
    width=510,
    spacing=(0.2, 0.25),
  )
  # MONOCHROME1 (white is low): modality values 2 (255 - g), inverted after windowing.
  _write_dicom(
    tmp_path / "mono1.dcm",
    4 * (255 - g) + 100,
    photometric="MONOCHROME1",
    slope=0.5,
    intercept=-50,
    center=255,
    width=510,
  )
  for name in ("mono2.dcm", "mono1.dcm"):
    decoded = prediction.load_image(tmp_path / name).image
    np.testing.assert_array_equal(decoded, grey)
  out = tmp_path / "out"
  assert (
    predict.run_model(_config(), fake_model(), str(tmp_path), str(out), show_progress=False) == 0
  )
  fields, rows = _read_csv(out / "predictions.csv")
  assert "lung_area_cm2" in fields
  rows = {r["image"]: r for r in rows}
  twin = np.asarray(Image.open(out / "masks" / "twin.png"))
  assert twin.any()
  for stem in ("mono2", "mono1"):
    np.testing.assert_array_equal(np.asarray(Image.open(out / "masks" / f"{stem}.png")), twin)
    assert rows[f"{stem}.dcm"]["lung_fraction"] == rows["twin.png"]["lung_fraction"]
  area = (twin > 0).sum() * 0.2 * 0.25 / 100
  assert float(rows["mono2.dcm"]["lung_area_cm2"]) == pytest.approx(area, abs=1e-3)
  assert rows["mono2.dcm"]["pixel_spacing_mm"] == "0.2000x0.2500"
  assert rows["mono1.dcm"]["lung_area_cm2"] == "" and rows["twin.png"]["lung_area_cm2"] == ""


# ----- a portable model -----


def test_exported_model_predicts_like_the_run_directory(awkward_folder, tmp_path):
  """export -> predict --model (no run directory, no model code) gives predict's masks."""
  from configs import default

  config = default.get_config("smoke")
  run = tmp_path / "run"
  make_random_workdir(run, config)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cwd = pathlib.Path(__file__).resolve().parents[1]

  exported = tmp_path / "unet.cxr"
  done = run_module("cxr_jax.export", f"--workdir={run}", f"--output={exported}")
  assert done.returncode == 0, done.stderr[-3000:]
  run.rename(tmp_path / "gone")  # the file must not need the run directory
  code = (
    "import sys, numpy as np; from cxr_jax.core.inference import portable; "
    f"m = portable.PortableModel({str(exported)!r}); out = m(np.zeros((3, 32, 32, 1))); "
    "assert out['prob'].shape == (3, 32, 32), out; "
    "assert 'cxr_jax.core.models' not in sys.modules  # no model code\n"
    "assert not {'tensorflow_datasets', 'grain'} & set(sys.modules)  # nor the input pipeline"
  )
  subprocess.run([sys.executable, "-c", code], check=True, cwd=cwd, env=env, timeout=120)
  done = run_module(
    "cxr_jax.predict",
    f"--model={exported}",
    f"--input={awkward_folder}",
    f"--output={tmp_path / 'from_file'}",
  )
  assert done.returncode == 1 and "notes.png" in done.stderr  # the unreadable file, as before
  (tmp_path / "gone").rename(run)
  done = run_module(
    "cxr_jax.predict",
    f"--workdir={run}",
    f"--input={awkward_folder}",
    f"--output={tmp_path / 'from_run'}",
    "--checkpoint=best",
  )
  assert done.returncode == 1
  _, from_file = _read_csv(tmp_path / "from_file" / "predictions.csv")
  _, from_run = _read_csv(tmp_path / "from_run" / "predictions.csv")
  assert len(from_run) == len(EXPECTED)
  for a, b in zip(from_file, from_run):  # the uncertainty sums in another order: to 1e-5
    assert float(a.pop("uncertainty")) == pytest.approx(float(b.pop("uncertainty")), abs=1e-5)
  assert from_file == from_run
  for name in EXPECTED:
    stem = pathlib.Path(name).stem
    np.testing.assert_array_equal(
      np.asarray(Image.open(tmp_path / "from_file" / "masks" / f"{stem}.png")),
      np.asarray(Image.open(tmp_path / "from_run" / "masks" / f"{stem}.png")),
    )


def test_calibrated_column_uses_the_temperature_evaluate_fitted(
  awkward_folder, tmp_path, fake_model, capsys
):
  (tmp_path / "calibration.json").write_text(json.dumps({"step": 40, "temperature": 2.5}))
  assert prediction_model.read_temperature(str(tmp_path), 40) == 2.5
  assert (
    prediction_model.read_temperature(str(tmp_path), 60) is None
  )  # fitted for another checkpoint
  assert "fitted for step 40, not 60" in capsys.readouterr().err
  assert prediction_model.read_temperature(str(tmp_path / "elsewhere"), 40) is None
  config = _config()
  inference = Inference(config, fake_model(classify=True), batch_size=2)
  rows, _ = prediction.predict_files(
    inference,
    [awkward_folder / "colour.jpg"],
    tmp_path / "out",
    show_progress=False,
    temperature=2.5,
  )
  p, calibrated = float(rows[0]["p_abnormal"]), float(rows[0]["p_abnormal_calibrated"])
  expected = 1 / (1 + np.exp(-np.log(p / (1 - p)) / 2.5))
  assert calibrated == pytest.approx(expected, abs=1e-6) and abs(calibrated - 0.5) < abs(p - 0.5)
