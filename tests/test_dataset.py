"""The cxr_masks_and_labels builder on a fake Kaggle archive made here, and on the real data."""

import collections
import io
import logging
import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys
import zipfile

import ml_collections
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from PIL import Image

from cxr_jax.core.run import run_data
from cxr_jax.data import cxr_masks_and_labels
from cxr_jax.data import datasets
from cxr_jax.data import kaggle_archive
from cxr_jax.data import phantoms
from cxr_jax.data import prepare
from cxr_jax.data import splits as splits_lib
from cxr_jax.data.records import DataError

RNG = np.random.default_rng(0)
GREY = RNG.integers(0, 256, (40, 48), dtype=np.uint8)  # MCUCXR_0001_0, 8-bit greyscale
DEEP = RNG.integers(1000, 4001, (48, 40)).astype(np.uint16)  # MCUCXR_0002_1, 16-bit
PALETTE = RNG.integers(0, 256, (36, 36), dtype=np.uint8)  # CHNCXR_0001_0, palette PNG
RGB = RNG.integers(0, 256, (30, 44, 3), dtype=np.uint8)  # CHNCXR_0002_1, RGB JPEG
PLAIN = RNG.integers(0, 256, (32, 32), dtype=np.uint8)  # CHNCXR_0003_1 / 0005_0


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
  image = Image.fromarray(array)
  if mode == "P":
    image = image.convert("RGB").quantize(64)
  buffer = io.BytesIO()
  image.save(buffer, format="png")
  return buffer.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="jpeg", quality=90)
  return buffer.getvalue()


def _soft_mask(shape, top, left, height, width) -> np.ndarray:
  """A rectangle of 255 with a one-pixel border of 100 (below the >127 threshold)."""
  mask = np.zeros(shape, np.uint8)
  mask[top - 1 : top + height + 1, left - 1 : left + width + 1] = 100
  mask[top : top + height, left : left + width] = 255
  return mask


MASKS = {  # id -> (mask as stored, the 0/1 mask that must come back)
  "MCUCXR_0001_0": _soft_mask((40, 48), 5, 6, 20, 10),
  "MCUCXR_0002_1": _soft_mask((48, 40), 10, 3, 8, 30),
  "CHNCXR_0001_0": _soft_mask((36, 36), 2, 2, 30, 12),
  "CHNCXR_0002_1": _soft_mask((30, 44), 4, 20, 20, 20),
}

MONTGOMERY_READING = "Patient's Sex: F\nPatient's Age: 027Y\n\nnormal \n"
SHENZHEN_READING = "male 45yrs\nSTB,ATB in the left upper field\n"
SHENZHEN_READING_2 = "female  35 yrs\r\nnormal\r\n"


def _tree_files() -> dict[str, bytes]:
  """One copy of the 'Lung Segmentation/' tree: good files and broken ones."""
  png = _png(PLAIN)
  files = {
    "CXR_png/MCUCXR_0001_0.png": _png(GREY),
    "CXR_png/MCUCXR_0002_1.png": _png(DEEP),
    "CXR_png/CHNCXR_0001_0.png": _png(PALETTE, mode="P"),
    "CXR_png/CHNCXR_0001_0.jpg": _jpeg(PLAIN),  # duplicate id: skipped, the .png is kept
    "CXR_png/CHNCXR_0002_1.jpg": _jpeg(RGB),
    "CXR_png/CHNCXR_0003_1.png": png,  # no mask
    "CXR_png/CHNCXR_0004_0.png": png[: len(png) // 2],  # truncated: skipped with its mask
    "CXR_png/CHNCXR_0005_0.png": png,  # its mask has the wrong size: kept without mask
    "masks/MCUCXR_0001_0.png": _png(MASKS["MCUCXR_0001_0"]),
    "masks/MCUCXR_0002_1.png": _png(MASKS["MCUCXR_0002_1"]),
    "masks/CHNCXR_0001_0_mask.png": _png(MASKS["CHNCXR_0001_0"]),
    "masks/CHNCXR_0002_1_mask.png": _png(MASKS["CHNCXR_0002_1"]),
    "masks/CHNCXR_0004_0_mask.png": _png(_soft_mask((32, 32), 2, 2, 8, 8)),
    "masks/CHNCXR_0005_0_mask.png": _png(_soft_mask((30, 32), 2, 2, 8, 8)),
    "masks/CHNCXR_0099_1_mask.png": _png(_soft_mask((32, 32), 2, 2, 8, 8)),  # no image
    "test/CHNCXR_0003_1.png": png,
    "ClinicalReadings/MCUCXR_0001_0.txt": MONTGOMERY_READING.encode(),
    "ClinicalReadings/CHNCXR_0001_0.txt": SHENZHEN_READING.encode(),
    "ClinicalReadings/CHNCXR_0002_1.txt": SHENZHEN_READING_2.encode(),
  }
  return files


EXPECTED_IDS = {
  "MCUCXR_0001_0",
  "MCUCXR_0002_1",
  "CHNCXR_0001_0",
  "CHNCXR_0002_1",
  "CHNCXR_0003_1",
  "CHNCXR_0005_0",
}
EXPECTED_SKIPPED = {
  "Lung Segmentation/CXR_png/CHNCXR_0001_0.jpg": "duplicate id",
  "Lung Segmentation/CXR_png/CHNCXR_0004_0.png": "unreadable image",
  "Lung Segmentation/masks/CHNCXR_0004_0_mask.png": "its image was skipped",
  "Lung Segmentation/masks/CHNCXR_0005_0_mask.png": "mask is 30x32 but its image is 32x32",
  "Lung Segmentation/masks/CHNCXR_0099_1_mask.png": "mask without an image",
}


@pytest.fixture(scope="module")
def archive_dir(tmp_path_factory) -> pathlib.Path:
  """The archive as unpacked: both roots (the data/ copy must be ignored) and stray files."""
  root = tmp_path_factory.mktemp("archive")
  for prefix in ("Lung Segmentation/", "data/Lung Segmentation/"):
    for name, data in _tree_files().items():
      path = root / prefix / name
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(data)
  (root / "NLM-ChinaCXRSet-ReadMe.docx").write_bytes(b"not a zip")
  (root / "Lung Segmentation/.ipynb_checkpoints").mkdir()
  (root / "Lung Segmentation/.ipynb_checkpoints/x.png").write_bytes(_png(PLAIN))
  return root


@pytest.fixture(scope="module")
def archive_zip(archive_dir, tmp_path_factory) -> pathlib.Path:
  path = tmp_path_factory.mktemp("zipped") / "chest-xray-masks-and-labels.zip"
  with zipfile.ZipFile(path, "w") as z:
    for file in sorted(archive_dir.rglob("*")):
      if file.is_file():
        z.write(file, file.relative_to(archive_dir).as_posix())
  return path


def _records(builder) -> dict[str, dict]:
  """All records of all splits, by id."""
  out = {}
  for split in builder.info.splits:
    source = builder.as_data_source(split)
    for i in range(len(source)):
      record = source[i]
      image_id = record["id"].decode("utf-8")
      assert image_id not in out, f"{image_id} twice"
      out[image_id] = record
  return out


def _check_fake_archive_records(records: dict[str, dict]) -> None:
  assert set(records) == EXPECTED_IDS
  for image_id, r in records.items():
    assert r["label"] == int(image_id[-1])
    assert r["source"] == (0 if image_id.startswith("MCUCXR") else 1)
    assert r["image"].dtype == np.uint8 and r["image"].ndim == 3 and r["image"].shape[2] == 1
    assert r["mask"].shape == r["image"].shape
    assert set(np.unique(r["mask"])) <= {0, 1}
    assert bool(r["has_mask"]) == (image_id in MASKS)
    if image_id in MASKS:
      np.testing.assert_array_equal(r["mask"][..., 0], (MASKS[image_id] > 127).astype(np.uint8))
    else:
      assert not r["mask"].any()
  # Native sizes and the 8-bit greyscale conversions.
  np.testing.assert_array_equal(records["MCUCXR_0001_0"]["image"][..., 0], GREY)
  scaled = np.round((DEEP - DEEP.min()) * (255.0 / (DEEP.max() - DEEP.min())))
  np.testing.assert_array_equal(records["MCUCXR_0002_1"]["image"][..., 0], scaled)
  palette = Image.open(io.BytesIO(_png(PALETTE, mode="P"))).convert("L")
  np.testing.assert_array_equal(records["CHNCXR_0001_0"]["image"][..., 0], np.asarray(palette))
  jpeg = Image.open(io.BytesIO(_jpeg(RGB))).convert("L")
  np.testing.assert_array_equal(records["CHNCXR_0002_1"]["image"][..., 0], np.asarray(jpeg))
  np.testing.assert_array_equal(records["CHNCXR_0005_0"]["image"][..., 0], PLAIN)
  assert records["CHNCXR_0002_1"]["image"].shape == (30, 44, 1)

  # Clinical readings, both formats; absent -> '' / -1.
  def reading(image_id):
    r = records[image_id]
    return r["sex"].decode(), int(r["age"]), r["finding"].decode()

  assert reading("MCUCXR_0001_0") == ("F", 27, "normal")
  assert reading("CHNCXR_0001_0") == ("M", 45, "STB,ATB in the left upper field")
  assert reading("CHNCXR_0002_1") == ("F", 35, "normal")
  assert reading("MCUCXR_0002_1") == ("", -1, "")


def _check_skipped(builder, location_prefix: str = "") -> None:
  skipped = builder.info.metadata["skipped"]
  assert len(skipped) == len(EXPECTED_SKIPPED), skipped
  for file, reason in EXPECTED_SKIPPED.items():
    assert any(line.startswith(location_prefix + file) and reason in line for line in skipped), (
      file,
      skipped,
    )


def test_kaggle_folder_with_both_roots(archive_dir, tmp_path, caplog, capsys):
  with caplog.at_level(logging.INFO):
    builder = datasets.load_builder("kaggle", data_dir=str(tmp_path), manual_dir=str(archive_dir))
  _check_fake_archive_records(_records(builder))
  _check_skipped(builder)
  summary = [r.getMessage() for r in caplog.records if "Build summary" in r.getMessage()]
  assert summary == [
    "Build summary: 5 files skipped (duplicate id: 1, mask without an image: 1, "
    "unreadable image: 1, its image was skipped: 1, mask size differs: 1)."
  ], summary
  # The CLI reloads the prepared dataset (manual_dir is not read again) and prints counts
  # and the skipped files kept in the dataset's metadata.
  if "dataset" not in flags.FLAGS:  # defined by `python -m cxr_jax.data.prepare` only
    prepare.define_flags()
  with flagsaver.flagsaver(dataset="kaggle", data_dir=str(tmp_path), manual_dir="/nonexistent"):
    prepare.main(["prepare"])
  out = capsys.readouterr().out
  assert re.search(r"^all +6 +4 +2 +3 +3 +2 +4$", out, re.MULTILINE), out
  assert "mask_not_binary=0, mask_size_differs=0" in out
  assert "skipped files: 5" in out and "CHNCXR_0099_1_mask.png: mask without an image" in out


def test_two_runs_preparing_at_once_both_get_the_dataset(archive_dir, tmp_path):
  """A sweep with --parallel=2 starts two runs on an empty data_dir: before the lock the
  second failed renaming its build into place (FileExistsError)."""
  code = (
    "import sys; from cxr_jax.data import datasets; "
    "b = datasets.load_builder('kaggle', data_dir=sys.argv[1], manual_dir=sys.argv[2]); "
    "print(b.info.splits.total_num_examples)"
  )
  runs = [
    subprocess.Popen(
      [sys.executable, "-c", code, str(tmp_path), str(archive_dir)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    for _ in range(2)
  ]
  results = [run.communicate(timeout=300) for run in runs]
  for run, (out, err) in zip(runs, results):
    assert run.returncode == 0, err[-2000:]
    assert out.split()[-1] == "6", out
  built = [p for p in (tmp_path / "cxr_masks_and_labels" / "kaggle").iterdir()]
  assert [p.name for p in built] == [cxr_masks_and_labels.CxrMasksAndLabels.VERSION.__str__()]


def test_kaggle_zip(archive_zip, tmp_path):
  builder = datasets.load_builder("kaggle", data_dir=str(tmp_path), manual_dir=str(archive_zip))
  _check_fake_archive_records(_records(builder))
  _check_skipped(builder)


def test_folder_holding_a_zip_is_found(archive_zip):
  archive = kaggle_archive.find_archive(archive_zip.parent)
  assert archive.root == "Lung Segmentation/"
  assert archive.ignored_roots == ["data/Lung Segmentation/"]
  records, _ = kaggle_archive.scan_archive(archive)
  assert {r.id for r in records} == EXPECTED_IDS | {"CHNCXR_0004_0"}  # decoded at build time


def test_only_the_data_root(archive_dir, tmp_path):
  only_data = tmp_path / "only_data"
  shutil.copytree(archive_dir / "data", only_data / "data")
  archive = kaggle_archive.find_archive(only_data)
  assert archive.root == "data/Lung Segmentation/" and not archive.ignored_roots


def test_strict_raises_with_the_file_name(archive_dir, tmp_path):
  with pytest.raises(DataError, match=r"CHNCXR_0001_0\.jpg: duplicate id"):
    datasets.load_builder(
      "kaggle", data_dir=str(tmp_path), manual_dir=str(archive_dir), strict=True
    )


def test_empty_manual_dir_says_where_and_what(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(kaggle_archive.ArchiveError) as error:
    datasets.load_builder(
      "kaggle", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "empty")
    )
  message = str(error.value)
  assert str(tmp_path / "empty") in message
  assert "CXR_png" in message and "Lung Segmentation" in message and "manual_dir" in message
  with pytest.raises(kaggle_archive.ArchiveError, match="does not exist"):
    kaggle_archive.find_archive(tmp_path / "missing")


@pytest.mark.parametrize(
  "text, expected",
  [
    (MONTGOMERY_READING, ("F", 27, "normal")),
    (
      "Patient's Sex: M\nPatient's Age: 045Y\nright upper lobe\ncavity\n",
      ("M", 45, "right upper lobe cavity"),
    ),
    (SHENZHEN_READING, ("M", 45, "STB,ATB in the left upper field")),
    ("Female 8yrs\nnormal", ("F", 8, "normal")),
    ("", ("", -1, "")),
  ],
)
def test_parse_readings(text, expected):
  assert kaggle_archive.parse_readings(text) == expected


def test_split_of_is_stable_and_roughly_80_10_10():
  ids = [f"CHNCXR_{i:04d}_{i % 2}" for i in range(2000)]
  splits = [splits_lib.split_of(i) for i in ids]
  assert splits == [splits_lib.split_of(i) for i in ids]
  fractions = {s: splits.count(s) / len(ids) for s in ("train", "validation", "test")}
  assert 0.77 < fractions["train"] < 0.83 and 0.08 < fractions["test"] < 0.12


def test_synthetic_builder(tmp_path):
  builder = datasets.load_builder("synthetic", data_dir=str(tmp_path), synthetic_examples=12)
  assert builder.info.config_name == "synthetic_12"
  default = cxr_masks_and_labels.CxrMasksAndLabels(
    config=cxr_masks_and_labels.config_for("synthetic", 400), data_dir=str(tmp_path)
  )
  assert default.info.config_name == "synthetic"
  records = _records(builder)
  assert set(records) == {f"synthetic_{i:05d}" for i in range(12)}
  for image_id, r in records.items():
    phantom = phantoms.make_phantom(phantoms.SYNTHETIC_SEED, int(image_id[-5:]))
    np.testing.assert_array_equal(r["image"][..., 0], phantom.image)
    expected_mask = phantom.lungs if phantom.has_mask else np.zeros_like(phantom.lungs)
    np.testing.assert_array_equal(r["mask"][..., 0], expected_mask)
    assert bool(r["has_mask"]) == phantom.has_mask and r["label"] == phantom.label
    assert r["source"] == 2 and int(r["age"]) == -1
    np.testing.assert_array_equal(r["spacing_mm"], [0, 0])  # phantoms have no spacing


def test_resolve_name(archive_dir, tmp_path, monkeypatch):
  monkeypatch.delenv(datasets.MANUAL_DIR_ENV, raising=False)
  config = ml_collections.ConfigDict({"name": "auto", "manual_dir": ""})
  assert datasets.resolve_name(config) == ("synthetic", "")
  config.manual_dir = str(tmp_path)  # exists, holds no archive
  assert datasets.resolve_name(config) == ("synthetic", "")
  config.manual_dir = str(tmp_path / "misspelt")  # does not exist: an error (test_hardening)
  with pytest.raises(ValueError, match="does not exist"):
    datasets.resolve_name(config)
  config.manual_dir = ""
  monkeypatch.setenv(datasets.MANUAL_DIR_ENV, str(archive_dir))
  assert datasets.resolve_name(config) == ("kaggle", str(archive_dir))
  config.name = "synthetic"
  assert datasets.resolve_name(config) == ("synthetic", "")
  config.name = "imagenet"
  with pytest.raises(ValueError, match="valid: kaggle, synthetic"):
    datasets.resolve_name(config)


def test_real_archive_counts(shared_data_dir, tmp_path):
  """The copy in ../shared/data: 659 images, counts as in its README."""
  builder = datasets.load_builder("kaggle", data_dir=str(tmp_path), manual_dir=str(shared_data_dir))
  counts = prepare.split_counts(builder)
  total = sum(counts.values(), collections.Counter())
  assert total["total"] == 659
  assert (total["with_mask"], total["without_mask"]) == (563, 96)
  assert (total["montgomery"], total["shenzhen"]) == (110, 549)
  assert (total["normal"], total["abnormal"]) == (334, 325)
  assert total["size 512x512"] == 659
  assert total["mask_not_binary"] == total["mask_size_differs"] == 0
  assert total["empty_mask_with_has_mask"] == total["mask_without_has_mask"] == 0
  assert builder.info.metadata["skipped"] == []
  assert set(counts) == {"train", "validation", "test"}


def test_data_sources_pickle_for_grain_workers(tmp_path):
  """grain workers unpickle the data source, which re-creates the builder by config."""
  for num_examples in (12, 400):
    config = cxr_masks_and_labels.config_for("synthetic", num_examples)
    assert pickle.loads(pickle.dumps(config)) is config
  kaggle = cxr_masks_and_labels.config_for("kaggle")
  assert pickle.loads(pickle.dumps(kaggle)) is kaggle
  builder = datasets.load_builder("synthetic", data_dir=str(tmp_path), synthetic_examples=12)
  source = builder.as_data_source("train")
  copy = pickle.loads(pickle.dumps(source))
  assert len(copy) == len(source) and copy[0]["id"] == source[0]["id"]


def test_importing_prepare_defines_no_flags():
  """Importing the prepare command must not define its CLI flags in other programs."""
  code = (
    "from absl import flags; import cxr_jax.data.prepare as p; "
    "leaked = [n for n in ('dataset', 'manual_dir', 'data_dir', 'strict', "
    "'synthetic_examples') if n in flags.FLAGS]; assert not leaked, leaked; "
    "p.define_flags(); assert 'manual_dir' in flags.FLAGS"
  )
  subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).parents[1])


def test_missing_split_says_which_and_what_to_change(tmp_path):
  builder = datasets.load_builder("synthetic", data_dir=str(tmp_path), synthetic_examples=12)
  missing = {"train", "validation", "test"} - set(builder.info.splits)
  assert missing  # 12 phantoms leave a split empty; the builder drops it
  split = missing.pop()
  with pytest.raises(
    ValueError,
    match=(
      rf"no '{split}' split .*--config.data.synthetic_examples to at least "
      rf"{cxr_masks_and_labels.min_examples('synthetic')}"
    ),
  ):
    datasets.split_source(builder, split)
  present = next(iter(builder.info.splits))
  records = datasets.split_source(builder, present, skip_decoding=("image",))
  assert isinstance(records[0]["image"], bytes) and records[0]["mask"].ndim == 3


def test_min_synthetic_examples_fills_every_split():
  n = cxr_masks_and_labels.min_examples("synthetic")
  splits = [splits_lib.split_of(f"synthetic_{i:05d}") for i in range(n)]
  assert set(splits) == {"train", "validation", "test"}
  assert len(set(splits[:-1])) == 2


def test_open_dataset_builds_on_process_0_first(tmp_path, monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  calls = []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(
    multihost_utils, "broadcast_one_to_all", lambda x: calls.append(("sync", int(x))) or x
  )
  real_load = datasets.load_builder
  monkeypatch.setattr(
    datasets, "load_builder", lambda *a, **k: calls.append(("load",)) or real_load(*a, **k)
  )
  data_config = ml_collections.ConfigDict(
    {"name": "synthetic", "manual_dir": "", "data_dir": str(tmp_path), "synthetic_examples": 12}
  )
  synthetic = ("sync", 1)  # the cross-host check of the resolved name (its registry index)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  assert run_data.open_dataset(data_config).builder.info.config_name == "synthetic_12"
  assert calls == [synthetic, ("load",), ("sync", 1)]  # built before the others are released
  calls.clear()
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert run_data.open_dataset(data_config).builder.info.config_name == "synthetic_12"
  assert calls == [synthetic, ("sync", 1), ("load",)]  # loads only after process 0 is done
  # Process 0 failing: it raises its own error, the others a pointer to it.
  answers = iter([1, 0])  # process 0 resolved 'synthetic' too, then failed to build it
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: np.int32(next(answers)))
  with pytest.raises(RuntimeError, match="Process 0 failed to prepare"):
    run_data.open_dataset(data_config)
