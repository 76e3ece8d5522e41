"""The dataset kinds beyond the Kaggle archive, each prepared from a small replica written in
its distributed layout (tests/replicas.py): counts, labels, masks, findings, patient-disjoint
splits and the official lists."""

import collections

import numpy as np
import pytest

from cxr_jax.data import chexmask
from cxr_jax.data import datasets
from cxr_jax.data import findings
from cxr_jax.data import images
from cxr_jax.data import jsrt
from cxr_jax.data import protocols
from cxr_jax.data import records
from cxr_jax.data.records import DataError
from tests import replicas


def _prepare(name, manual_dir, data_dir, strict=False):
  return datasets.load_builder(
    name, data_dir=str(data_dir), manual_dir=str(manual_dir), strict=strict
  )


def _records(builder) -> dict[str, tuple[str, dict]]:
  """id -> (split, record) of every prepared example."""
  out = {}
  for split in builder.info.splits:
    source = datasets.split_source(builder, split)
    for i in range(len(source)):
      record = source[i]
      out[records.decode_id(record["id"])] = (split, record)
  return out


def _structures(record, names=records.STRUCTURES) -> np.ndarray:
  return images.decode_structures(record["structures"], names)


def _assert_patients_in_one_split(by_id):
  splits_of = collections.defaultdict(set)
  for split, record in by_id.values():
    splits_of[records.decode_id(record["patient"])].add(split)
  assert all(len(s) == 1 for s in splits_of.values()), splits_of


# ----- folders -----


def test_folders_masks_labels_spacing_and_patients(tmp_path):
  chests = replicas.write_folders(tmp_path / "mine", count=24)
  builder = _prepare("folders", tmp_path / "mine", tmp_path / "tfds")
  by_id = _records(builder)
  assert set(by_id) == set(chests)
  assert builder.info.metadata["findings"] == ["Effusion", "Nodule"]
  for image_id, (_, record) in by_id.items():
    i = int(image_id[-3:])
    np.testing.assert_array_equal(record["mask"][..., 0], chests[image_id]["lungs"])
    assert record["has_mask"] and list(record["has_structures"]) == [True, False, False]
    assert list(record["findings"]) == [i % 2, findings.MISSING if i % 3 else findings.UNCERTAIN]
    assert record["label"] == i % 2  # abnormal: any finding positive
    assert record["patient"].decode() == f"p{i // 2}"
    assert list(record["spacing_mm"]) == [0.5, 0.5]
  _assert_patients_in_one_split(by_id)


def test_folders_label_map_gives_one_mask_per_structure(tmp_path):
  root = tmp_path / "mine"
  chest = replicas.draw_chest(40, 40, seed=3)
  label_map = chest["lungs"] * 1 + chest["heart"] * 2
  label_map[chest["clavicles"] > 0] = 3
  replicas.png(chest["image"], root / "images" / "a.png")
  replicas.png(label_map.astype(np.uint8), root / "masks" / "a.png")
  (root / "label_map.json").write_text('{"1": "lungs", "2": "heart", "3": "clavicles"}')
  ((_, record),) = _records(_prepare("folders", root, tmp_path / "tfds")).values()
  planes = _structures(record)
  np.testing.assert_array_equal(planes[..., 0], label_map == 1)
  np.testing.assert_array_equal(planes[..., 1], label_map == 2)
  np.testing.assert_array_equal(planes[..., 2], label_map == 3)
  np.testing.assert_array_equal(record["mask"][..., 0], label_map == 1)
  assert list(record["has_structures"]) == [True, True, True]


def test_folders_errors_name_the_file_and_what_was_expected(tmp_path, caplog):
  root = tmp_path / "mine"
  replicas.write_folders(root, count=12)
  replicas.png(np.zeros((10, 10), np.uint8), root / "masks" / "case_001.png")  # wrong size
  replicas.write_csv(root / "labels.csv", ["id", "Effusion"], [["case_000", 1], ["ghost", 0]])
  builder = _prepare("folders", root, tmp_path / "tfds")
  skipped = builder.info.metadata["skipped"]
  assert "masks/case_001.png: mask size differs (mask is 10x10 but its image is 48x40; " in (
    " ".join(skipped)
  )
  assert any("labels.csv: id without an image (line 3: no images/ghost.*)" in s for s in skipped)

  replicas.write_csv(root / "labels.csv", ["id", "Effusion"], [["case_000", "yes"]])
  with pytest.raises(
    DataError, match=r"labels.csv, line 2: column 'Effusion' is 'yes'; expected 1"
  ):
    _prepare("folders", root, tmp_path / "tfds2")

  (root / "labels.csv").unlink()
  (root / "label_map.json").write_text('{"255": "lungs"}')
  replicas.png(np.full((48, 40), 7, np.uint8), root / "masks" / "case_002.png")
  with pytest.raises(DataError, match=r"case_002.png: values outside the label map \(values \[7\]"):
    _prepare("folders", root, tmp_path / "tfds3", strict=True)


# ----- JSRT + SCR -----


def test_jsrt_img_is_read_as_12_bit_big_endian_and_inverted():
  display = np.zeros((2048, 2048), np.uint8)
  display[:1024] = 200  # bright (bone-like) top
  raw = jsrt.read_img(replicas.jsrt_img(display))
  assert raw.dtype == np.uint16 and raw.shape == (2048, 2048) and raw.max() <= 4095
  assert raw[0, 0] == 4095 - 200 * 16 and raw[-1, -1] == 4095
  shown = jsrt.to_display(raw)
  assert shown.shape == (1024, 1024) and shown[0, 0] == 255 and shown[-1, -1] == 0
  with pytest.raises(ValueError, match="a JSRT image has 2048x2048x2"):
    jsrt.read_img(b"\0" * 100)


def test_jsrt_with_scr_structures(tmp_path):
  chests = replicas.write_jsrt(tmp_path / "jsrt")
  builder = _prepare("jsrt", tmp_path / "jsrt", tmp_path / "tfds")
  by_id = _records(builder)
  assert sorted(by_id) == sorted(chests)
  assert builder.info.metadata["findings"] == ["Nodule"]
  for image_id, (_, record) in by_id.items():
    assert record["image"].shape == (1024, 1024, 1)
    assert record["label"] == int(image_id.startswith("JPCLN")) == record["findings"][0]
    assert list(record["spacing_mm"]) == pytest.approx([0.35, 0.35])
    if image_id == replicas.JSRT_IDS[-1]:  # written without outlines
      assert not record["has_mask"] and not record["has_structures"].any()
      continue
    assert list(record["has_structures"]) == [True, True, True]
    planes = _structures(record)
    for k, name in enumerate(records.STRUCTURES):
      np.testing.assert_array_equal(planes[..., k], chests[image_id][name], err_msg=name)


# ----- COVID-QU-Ex -----


def test_covid_qu_ex_reads_the_lung_set_in_its_official_splits(tmp_path):
  truth = replicas.write_covid_qu_ex(tmp_path / "covid")
  builder = _prepare("covid_qu_ex", tmp_path / "covid", tmp_path / "tfds")
  by_id = _records(builder)
  assert set(by_id) == set(truth) and len(by_id) == 18  # the infection set's copies not read
  assert builder.info.metadata["findings"] == ["COVID-19", "Non-COVID"]
  official = {"Train": "train", "Val": "validation", "Test": "test"}
  for image_id, (split, record) in by_id.items():
    folder, label, lungs = truth[image_id]
    assert split == official[folder]
    assert record["label"] == int(label != "Normal")
    assert list(record["findings"]) == [int(label == "COVID-19"), int(label == "Non-COVID")]
    np.testing.assert_array_equal(record["mask"][..., 0], lungs)


# ----- CheXmask -----


def test_chexmask_rle_decodes_as_the_dataset_encodes():
  rng = np.random.default_rng(0)
  mask = (rng.random((7, 9)) < 0.4).astype(np.uint8)
  mask[0, 0], mask[-1, -1] = 1, 1  # runs touching both ends
  rle = replicas.chexmask_rle(mask)
  np.testing.assert_array_equal(chexmask.decode_rle(rle, 7, 9), mask)
  assert chexmask.decode_rle("", 2, 3).sum() == 0
  assert chexmask.decode_rle("2 3", 2, 3).tolist() == [[0, 1, 1], [1, 0, 0]]  # 1-based, by rows
  with pytest.raises(ValueError, match="runs outside a 2x3 mask"):
    chexmask.decode_rle("5 4", 2, 3)


def test_chexmask_lungs_and_heart_over_chestxray8_images(tmp_path):
  chests = replicas.write_chexmask(tmp_path / "chexmask")
  builder = _prepare("chexmask", tmp_path / "chexmask", tmp_path / "tfds")
  by_id = _records(builder)
  assert set(by_id) == set(chests)
  assert any(
    "rows without an image" in s and "1 rows" in s for s in builder.info.metadata["skipped"]
  )
  for image_id, (_, record) in by_id.items():
    planes = _structures(record, ("lungs", "heart"))
    np.testing.assert_array_equal(planes[..., 0], chests[image_id]["lungs"])
    np.testing.assert_array_equal(planes[..., 1], chests[image_id]["heart"])
    assert record["patient"].decode() == image_id.split("_")[0]
  _assert_patients_in_one_split(by_id)


# ----- ChestX-ray14 -----


def test_chestxray14_findings_patients_and_official_test_list(tmp_path):
  truth = replicas.write_chestxray14(tmp_path / "nih")
  builder = _prepare("chestxray14", tmp_path / "nih", tmp_path / "tfds")
  by_id = _records(builder)
  names = builder.info.metadata["findings"]
  assert len(names) == 14 and set(by_id) == set(truth)
  for image_id, (split, record) in by_id.items():
    patient, labels = truth[image_id]
    positive = {names[k] for k in np.flatnonzero(record["findings"] == findings.POSITIVE)}
    assert positive == set(labels.split("|")) - {"No Finding"}
    assert record["label"] == int(labels != "No Finding")
    assert (split == "test") == (int(patient) <= 6)  # test_list.txt honoured
    assert record["spacing_mm"][1] == pytest.approx(0.143 * 2500 / 32)
  _assert_patients_in_one_split(by_id)
  assert {s for s, _ in by_id.values()} == {"train", "validation", "test"}


def test_two_build_workers_and_small_shards_write_what_one_process_writes(tmp_path):
  # The reader's own splits (patients, the official test list), its finding names and the
  # structures plane all travel through the spawned workers' reopened readers.
  replicas.write_chestxray14(tmp_path / "nih")
  one = _prepare("chestxray14", tmp_path / "nih", tmp_path / "one")
  two = datasets.load_builder(
    "chestxray14",
    data_dir=str(tmp_path / "two"),
    manual_dir=str(tmp_path / "nih"),
    workers=2,
    shard_examples=4,
  )
  assert two.info.metadata["findings"] == one.info.metadata["findings"]
  a, b = _records(one), _records(two)
  assert a.keys() == b.keys()
  for image_id, (split, record) in a.items():
    assert b[image_id][0] == split
    for key in ("patient", "findings", "structures", "has_structures", "image"):
      assert np.array_equal(record[key], b[image_id][1][key]), (image_id, key)


def test_kfold_puts_each_patient_in_one_fold():
  ids = [f"img{i:03d}" for i in range(60)]
  patients = [f"p{i // 4}" for i in range(60)]
  folds = protocols.kfold_assignment(ids, [i % 2 for i in range(60)], 5, patients=patients)
  by_patient = collections.defaultdict(set)
  for patient, fold in zip(patients, folds, strict=True):
    by_patient[patient].add(fold)
  assert all(len(f) == 1 for f in by_patient.values())
  assert set(folds) == set(range(5))


# ----- CheXpert -----


def test_chexpert_codes_frontal_views_and_valid_as_test(tmp_path):
  truth = replicas.write_chexpert(tmp_path / "chexpert")
  builder = _prepare("chexpert", tmp_path / "chexpert", tmp_path / "tfds")
  by_id = _records(builder)
  assert set(by_id) == set(truth)  # lateral views left out, and said so
  assert any("lateral views" in s for s in builder.info.metadata["skipped"])
  code = {"1.0": 1, "0.0": 0, "-1.0": -1, "": -2}
  for image_id, (split, record) in by_id.items():
    assert list(record["findings"]) == [code[c] for c in truth[image_id]]
    assert record["label"] == int(truth[image_id][0] != "1.0")
    assert (split == "test") == (int(image_id[7:12]) >= 64541)  # valid.csv
  _assert_patients_in_one_split(by_id)


def test_uncertain_label_policies():
  codes = np.array([1, 0, -1, -2], np.int8)
  assert findings.targets(codes, "ignore")[1].tolist() == [1, 1, 0, 0]
  assert findings.targets(codes, "ones")[0].tolist() == [1, 0, 1, 0]
  assert findings.targets(codes, "zeros")[0].tolist() == [1, 0, 0, 0]
  assert findings.targets(codes, "zeros")[1].tolist() == [1, 1, 1, 0]
  with pytest.raises(ValueError, match="valid: ignore, ones, zeros"):
    findings.targets(codes, "maybe")
