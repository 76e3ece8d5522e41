"""predict against hostile files and interruptions (issue 22, items 2-7, 9, 12-14): headers
checked before decoding, odd DICOMs, names that clash or are not UTF-8, damaged model files,
two predicts on one folder, Ctrl-C and a full disk. Most tests call predict in-process on the
fake model (`conftest.BrightIsLung`); one runs the command, on that model exported."""

import csv
import io
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import FileDataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.uid import RLELossless
from pydicom.uid import generate_uid

from cxr_jax import predict
from cxr_jax.core.inference import portable
from cxr_jax.core.run import run_lock
from cxr_jax.data import images
from cxr_jax.workflows import prediction
from cxr_jax.workflows import prediction_folder
from cxr_jax.workflows import prediction_model
from tests.conftest import REPO_ROOT
from tests.conftest import BrightIsLung
from tests.test_hardening import _tmpfs
from tests.test_predict import _config
from tests.test_predict import _lungs


def _rows(out: pathlib.Path) -> list[dict]:
  with open(out / "predictions.csv", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def _png(path, height=60, width=50, value=None) -> None:
  grey = (_lungs(height, width) * 255).astype(np.uint8) if value is None else value
  Image.fromarray(grey).save(path, format="PNG" if path.suffix == ".png" else None)


def _predict(inputs, out, model=None, **kwargs) -> int:
  return predict.run_model(_config(), model or BrightIsLung(), str(inputs), str(out), **kwargs)


def _peak_mib(function) -> float:
  """Peak Python/numpy allocation (MiB) while `function` runs."""
  tracemalloc.start()
  try:
    function()
    return tracemalloc.get_traced_memory()[1] / 2**20
  finally:
    tracemalloc.stop()


def _dicom(pixels: np.ndarray, **fields) -> bytes:
  """A DICOM radiograph (DX unless `fields` say otherwise): 16-bit grey, 8-bit RGB, or 32-bit
  float pixels, as their dtype and shape say."""
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = FileDataset("x", {}, file_meta=meta, preamble=b"\0" * 128)
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Modality, ds.PixelRepresentation = "DX", 0
  ds.Rows, ds.Columns = pixels.shape[:2]
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
  if pixels.ndim == 3:
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
  elif pixels.dtype == np.float32:
    ds.BitsAllocated = 32
  else:
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
  for key, value in fields.items():
    setattr(ds, key, value)
  if pixels.dtype == np.float32:
    ds.FloatPixelData = pixels.tobytes()
  elif not fields.get("compressed"):
    ds.PixelData = pixels.tobytes()
  if fields.get("compressed"):
    ds.compress(RLELossless, pixels)
  data = io.BytesIO()
  ds.save_as(data, enforce_file_format=True)
  return data.getvalue()


# ----- item 2: memory follows the pixel cap, not the file -----


def test_a_large_file_named_png_is_refused_without_being_read(tmp_path):
  fake = tmp_path / "huge.png"
  with open(fake, "wb") as f:  # 200 MB, sparse: no disk used
    f.truncate(200 * 2**20)

  def load():
    with pytest.raises(ValueError, match="huge.png: not a readable PNG/JPEG"):
      prediction.load_image(fake)

  assert _peak_mib(load) < 5


def test_images_over_the_pixel_cap_are_refused_from_their_header(tmp_path):
  """A 16 Mpx PNG and a 4 Mpx RLE DICOM (small files, large images) against a 1 Mpx cap:
  refused, naming size, cap and flag, with nothing decoded; the other images predicted."""
  Image.new("L", (4000, 4000), 90).save(tmp_path / "wide.png")
  block = np.zeros((2000, 2000), np.uint16)
  block[500:1500, 500:1500] = 3000
  (tmp_path / "rle.dcm").write_bytes(_dicom(block, compressed=True))
  _png(tmp_path / "small.png")
  for name, pixels in (("wide.png", "16,000,000"), ("rle.dcm", "4,000,000")):
    with pytest.raises(ValueError, match=f"{name}: .* = {pixels} pixels, over the cap of "):
      prediction.load_image(tmp_path / name, max_pixels=10**6)
    assert (
      _peak_mib(
        lambda n=name: pytest.raises(ValueError, prediction.load_image, tmp_path / n, 10**6)
      )
      < 3
    )  # the decoded image would take 16 MB (PNG) or 8 MB (DICOM)
  assert _predict(tmp_path, tmp_path / "out", show_progress=False, max_pixels=10**6) == 1
  assert [r["image"] for r in _rows(tmp_path / "out")] == ["small.png"]
  assert prediction.load_image(tmp_path / "wide.png").image.shape == (4000, 4000)  # default


# ----- items 3 and 12: DICOM -----


def test_dicom_spacing_of_one_value_is_square_and_a_negative_or_garbage_one_is_dropped(tmp_path):
  pixels = (_lungs(60, 50) * 3000).astype(np.uint16)
  (tmp_path / "one.dcm").write_bytes(_dicom(pixels, PixelSpacing="0.3"))
  (tmp_path / "negative.dcm").write_bytes(_dicom(pixels, PixelSpacing="-0.1\\0"))
  garbage = _dicom(pixels, PixelSpacing="9.9\\9.9").replace(b"9.9\\9.9", b"abc\\xyz")
  (tmp_path / "garbage.dcm").write_bytes(garbage)
  assert _predict(tmp_path, tmp_path / "out", show_progress=False) == 0  # no file stops the run
  rows = {r["image"]: r for r in _rows(tmp_path / "out")}
  mask = np.asarray(Image.open(tmp_path / "out" / rows["one.dcm"]["mask"])) > 0
  assert rows["one.dcm"]["pixel_spacing_mm"] == "0.3000x0.3000"
  assert float(rows["one.dcm"]["lung_area_cm2"]) == pytest.approx(mask.sum() * 0.09 / 100, 1e-3)
  for name in ("negative.dcm", "garbage.dcm"):
    assert rows[name]["lung_area_cm2"] == "" and float(rows[name]["lung_fraction"]) > 0.1
    assert any("not two positive numbers" in n for n in prediction.load_image(tmp_path / name)[2])


def test_an_rgb_dicom_is_predicted_as_its_luminance(tmp_path):
  grey = (_lungs(60, 50) * 255).astype(np.uint8)
  (tmp_path / "rgb.dcm").write_bytes(_dicom(np.stack([grey] * 3, -1)))
  np.testing.assert_array_equal(prediction.load_image(tmp_path / "rgb.dcm").image, grey)
  assert _predict(tmp_path / "rgb.dcm", tmp_path / "out", show_progress=False) == 0


def test_a_ct_slice_is_refused_naming_its_modality(tmp_path, capsys):
  (tmp_path / "ct.dcm").write_bytes(_dicom(np.zeros((40, 40), np.uint16), Modality="CT"))
  _png(tmp_path / "film.png")
  assert _predict(tmp_path, tmp_path / "out", show_progress=False) == 1
  assert "ct.dcm: Modality CT: not a projection radiograph" in capsys.readouterr().err
  assert [r["image"] for r in _rows(tmp_path / "out")] == ["film.png"]


def test_nan_pixels_in_a_dicom_are_counted_and_shown_black(tmp_path, capsys):
  values = _lungs(60, 50).astype(np.float32)
  values[:2, :] = np.nan
  (tmp_path / "nan.dcm").write_bytes(_dicom(values))
  loaded = prediction.load_image(tmp_path / "nan.dcm")
  assert (loaded.image[:2] == 0).all() and loaded.image[2:].max() == 255  # window from the rest
  assert _predict(tmp_path, tmp_path / "out", show_progress=False) == 0
  assert "nan.dcm: 100 of 3,000 pixels are NaN or infinite" in capsys.readouterr().err


# ----- item 13: deep PNGs and EXIF -----


def test_a_12_bit_png_with_one_hot_pixel_keeps_its_grey_levels(tmp_path):
  rng = np.random.default_rng(0)
  deep = (_lungs(200, 160) * 4000 + rng.integers(0, 95, (200, 160))).astype(np.uint16)
  Image.fromarray(deep).save(tmp_path / "clean.png")
  deep[7, 9] = 65535  # one dead detector element
  Image.fromarray(deep).save(tmp_path / "hot.png")
  clean = prediction.load_image(tmp_path / "clean.png").image.astype(float)
  hot = prediction.load_image(tmp_path / "hot.png").image.astype(float)
  assert clean.mean() > 60  # the 12-bit range spread over 0..255
  assert abs(hot.mean() - clean.mean()) < 1 and hot[7, 9] == 255
  assert images.decode_greyscale((tmp_path / "hot.png").read_bytes()).mean() == hot.mean()


def test_exif_orientation_turns_the_image_as_viewers_show_it(tmp_path):
  stored = (_lungs(40, 90) * 255).astype(np.uint8)  # wide as stored; tall as shown
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise to view
  Image.fromarray(stored).save(tmp_path / "turned.jpg", exif=exif, quality=95)
  shown = prediction.load_image(tmp_path / "turned.jpg").image
  assert shown.shape == (90, 40)
  assert np.abs(shown.astype(int) - np.rot90(stored, -1)).mean() < 3
  assert _predict(tmp_path / "turned.jpg", tmp_path / "out", show_progress=False) == 0
  (row,) = _rows(tmp_path / "out")
  assert (row["height"], row["width"]) == ("90", "40")
  assert Image.open(tmp_path / "out" / row["mask"]).size == (40, 90)


# ----- items 4 and 5: names -----


def test_a_file_name_that_is_not_utf8_is_predicted_and_written_escaped(tmp_path):
  folder = os.fsencode(tmp_path / "in")
  os.mkdir(folder)
  _png(tmp_path / "in" / "plain.png")
  Image.fromarray(np.full((30, 20), 200, np.uint8)).save(
    os.fsdecode(folder + b"/\xff\xfe bad.png"), format="PNG"
  )
  assert _predict(tmp_path / "in", tmp_path / "out", show_progress=False) == 0
  rows = {r["image"]: r for r in _rows(tmp_path / "out")}
  assert set(rows) == {"\\xff\\xfe bad.png", "plain.png"}
  assert rows["\\xff\\xfe bad.png"]["mask"] == "masks/\\xff\\xfe bad.png"
  assert Image.open(tmp_path / "out" / "masks" / "\\xff\\xfe bad.png").size == (20, 30)


def test_x_png_x_jpg_and_x_png_png_get_three_masks_each_named_in_its_row(tmp_path):
  sizes = {"x.png": (30, 20), "x.jpg": (40, 24), "x.png.png": (50, 28)}
  for name, (height, width) in sizes.items():
    _png(tmp_path / name, height, width)
  assert _predict(tmp_path, tmp_path / "out", show_progress=False) == 0
  rows = _rows(tmp_path / "out")
  assert len({r["mask"] for r in rows}) == 3
  for row in rows:
    mask = Image.open(tmp_path / "out" / row["mask"])
    assert (mask.height, mask.width) == sizes[row["image"]]


# ----- item 6: one predict, one model per output folder -----


def test_a_second_predict_into_an_output_in_use_is_refused(tmp_path, capsys):
  _png(tmp_path / "a.png")
  out = tmp_path / "out"
  out.mkdir()
  with run_lock.RunLock(str(out), lock_file=prediction_folder.LOCK_FILE):  # another predict
    assert _predict(tmp_path / "a.png", out, show_progress=False) == 2
  assert "is in use by another run" in capsys.readouterr().err
  assert not (out / "predictions.csv").exists() and not (out / "masks").exists()


def test_an_output_of_another_model_is_refused_and_the_same_model_resumes(tmp_path, capsys):
  for k in range(3):
    _png(tmp_path / f"{k}.png", 40 + k, 30)
  out = tmp_path / "out"
  assert _predict(tmp_path / "0.png", out, show_progress=False) == 0
  other = BrightIsLung()
  other.gain[...] = 5.0
  assert _predict(tmp_path / "0.png", out, model=other, show_progress=False) == 2
  assert "holds predictions of 'a model given in-process'" in capsys.readouterr().err
  assert _predict(tmp_path, out, show_progress=False) == 2  # the same model, another --input
  # A predict from before predict.json: its masks are not taken for this model's.
  (out / prediction_folder.IDENTITY_FILE).unlink()
  assert _predict(tmp_path / "0.png", out, show_progress=False) == 2
  assert "of an unknown model (no predict.json)" in capsys.readouterr().err


# ----- item 7: damaged model files -----


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> pathlib.Path:
  """The fake model exported as a portable file (cheap: a few dozen operations)."""
  path = tmp_path_factory.mktemp("model") / "fake.cxr"
  portable.export_model(_config(), BrightIsLung(), path, provenance={})
  return path


def _with_members(path, members: dict) -> None:
  with zipfile.ZipFile(path, "w") as z:
    for name, data in members.items():
      z.writestr(name, data)


@pytest.mark.parametrize(
  "damage", ["truncated", "random", "png", "no settings.json", "damaged model", "bad json"]
)
def test_a_damaged_model_file_is_refused_in_one_line_naming_it(
  model_file, tmp_path, damage, capsys
):
  data = model_file.read_bytes()
  with zipfile.ZipFile(model_file) as z:
    members = {name: z.read(name) for name in z.namelist()}
  bad = tmp_path / "bad.cxr"
  if damage == "truncated":
    bad.write_bytes(data[: len(data) // 2])
  elif damage == "random":
    bad.write_bytes(np.random.default_rng(0).bytes(len(data)))
  elif damage == "png":
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(bad, format="PNG")
  elif damage == "no settings.json":
    _with_members(bad, {"model.jax_exported": members["model.jax_exported"]})
  elif damage == "damaged model":
    _with_members(bad, {**members, "model.jax_exported": b"twelve bytes" * 100})
  else:
    _with_members(bad, {**members, "settings.json": b"{'image_size': 32"})
  _png(tmp_path / "a.png")
  status = predict.run("", str(tmp_path / "a.png"), str(tmp_path / "out"), model_file=str(bad))
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and len(err) == 1, err
  assert err[0].startswith(f"predict: error: {bad}: ") and "export" in err[0]


# ----- item 9: calibration -----


@pytest.mark.parametrize("temperature", [-1, 0, float("nan"), float("inf"), "warm"])
def test_a_temperature_that_is_not_positive_and_finite_is_refused_naming_the_file(
  tmp_path, temperature
):
  (tmp_path / "calibration.json").write_text(json.dumps({"step": 4, "temperature": temperature}))
  with pytest.raises(ValueError, match=f"{tmp_path}/calibration.json"):
    prediction_model.read_temperature(str(tmp_path), 4)


# ----- item 14: Ctrl-C and a full disk -----

# The command on an exported model; Ctrl-C (a real SIGINT) right after the 8th whole-file
# write: predict.json, two images' masks and overlays, the CSV with their rows, the third
# image's mask and overlay (its row not written yet).
_INTERRUPTED = textwrap.dedent("""
  import os, runpy, signal, sys
  from cxr_jax.workflows import prediction_folder
  # Ctrl-C's handler, also where the suite was started in the background (a shell starts
  # background jobs with SIGINT ignored, and Python then keeps it ignored).
  signal.signal(signal.SIGINT, signal.default_int_handler)
  original, calls = prediction_folder.write_whole, []
  def write_whole(path, data):
    original(path, data)
    calls.append(path)
    if len(calls) == 8:
      os.kill(os.getpid(), signal.SIGINT)
  prediction_folder.write_whole = write_whole
  sys.argv = ["predict", *sys.argv[1:]]
  runpy.run_module("cxr_jax.predict", run_name="__main__")
""")


def test_ctrl_c_keeps_the_finished_rows_and_the_rerun_predicts_only_the_rest(model_file, tmp_path):
  inputs, out = tmp_path / "in", tmp_path / "out"
  inputs.mkdir()
  for k in range(6):
    _png(inputs / f"{k}.png", 50 + k, 40)
  args = [f"--model={model_file}", f"--input={inputs}", f"--output={out}", "--batch_size=2"]
  done = subprocess.run(
    [sys.executable, "-c", _INTERRUPTED, *args, "--max_pixels=100000"],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=REPO_ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert done.returncode == 130, done.stderr[-3000:]
  last = done.stderr.strip().splitlines()[-1]
  assert "stopped (Ctrl-C or SIGTERM) after 2 of 6 images" in last and "checkpoint" not in last
  assert [r["image"] for r in _rows(out)] == ["0.png", "1.png"]
  assert sorted(p.name for p in (out / "masks").iterdir()) == ["0.png", "1.png", "2.png"]
  kept = {name: (out / "masks" / name).stat().st_mtime_ns for name in ("0.png", "1.png")}
  assert (
    predict.run("", str(inputs), str(out), model_file=str(model_file), show_progress=False) == 0
  )
  rows = _rows(out)
  assert [r["image"] for r in rows] == [f"{k}.png" for k in range(6)]
  assert [int(r["height"]) for r in rows] == [50 + k for k in range(6)]
  assert all((out / "masks" / n).stat().st_mtime_ns == t for n, t in kept.items())  # skipped
  assert not (out / prediction_folder.PARTIAL_CSV_FILE).exists()


def test_a_full_disk_during_predict_says_so_keeps_the_rows_and_leaves_no_half_written_png(
  tmp_path, capsys
):
  rng = np.random.default_rng(0)
  for k in range(8):  # noise: about 230 KB of overlay each
    _png(tmp_path / f"{k}.png", value=rng.integers(0, 255, (300, 260), dtype=np.uint8))
  with _tmpfs(tmp_path / "full", "size=1m") as full:
    status = _predict(tmp_path, full, show_progress=False)
    err = capsys.readouterr().err
    rows = _rows(full)
    pngs = [p for folder in ("masks", "overlays") for p in (full / folder).iterdir()]
    for png in pngs:
      Image.open(png).load()  # whole, or not there
    assert not any(p.name.startswith(prediction_folder.TMP_PREFIX) for p in pngs)
    assert {pathlib.Path(r["mask"]).name for r in rows} <= {p.name for p in pngs}
  assert status == 1 and 0 < len(rows) < 8
  last = err.strip().splitlines()[-1]
  assert "the disk is full" in last and f"after {len(rows)} of 8 images" in last
  assert "checkpoint" not in last
