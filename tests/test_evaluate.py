"""Evaluation: classifier statistics by hand, the native-resolution round trip, and the
whole command on records made in the test with a fake model (exact, compiles in a second)."""

import csv
import json
import math

import ml_collections
import numpy as np
import pytest

from cxr_jax import evaluate
from cxr_jax.core.inference.inference import Inference
from cxr_jax.core.stats import classification_stats
from cxr_jax.data import kaggle
from cxr_jax.data import preprocess
from cxr_jax.data import registry
from tests.conftest import run_module


def small_config() -> ml_collections.ConfigDict:
  from configs import default

  config = default.get_config()
  config.data.image_size = 32
  config.eval_batch_size = 4
  return config


def make_records(shapes, seed=0, sources=None, labels=None):
  """Records like the dataset's: a bright ellipse pair (lungs) on a dark image."""
  rng = np.random.default_rng(seed)
  records = []
  for k, (h, w) in enumerate(shapes):
    rows, cols = np.mgrid[:h, :w]
    mask = np.zeros((h, w), np.uint8)
    for cx in (0.3, 0.7):
      mask |= (
        ((rows - 0.5 * h) / (0.35 * h)) ** 2 + ((cols - cx * w) / (0.15 * w)) ** 2 <= 1
      ).astype(np.uint8)
    image = 30 + 160 * mask + rng.integers(0, 20, (h, w))
    label = 0 if labels is None else labels[k]
    if label:  # abnormal: a brighter top-left corner (what the fake classifier looks at)
      image[: h // 2, : w // 2] += 40
    source = 2 if sources is None else sources[k]
    spacing, estimated = kaggle.pixel_spacing(registry.source_names()[source], h, w)
    records.append(
      {
        "image": np.clip(image, 0, 255).astype(np.uint8)[..., None],
        "mask": mask[..., None],
        "has_mask": True,
        "label": label,
        "source": source,
        "id": f"case{k}".encode(),
        "spacing_mm": np.asarray(spacing, np.float32),
        "spacing_estimated": estimated,
      }
    )
  return records


# ----- classifier statistics -----


def test_one_auc_with_keyword_arguments():
  """One AUC, with keyword arguments (there were two, with opposite argument orders)."""
  assert not hasattr(evaluate, "roc_auc")
  labels = np.array([0, 0, 1, 1])
  scores = np.array([0.1, 0.4, 0.35, 0.8])
  assert classification_stats.roc_auc(scores=scores, labels=labels) == pytest.approx(0.75)
  summary = classification_stats.classification_summary(
    labels, scores, threshold=0.5, threshold_from="test", seed=0
  )
  assert summary["auc"] == pytest.approx(0.75)
  assert math.isnan(classification_stats.roc_auc(scores=np.arange(3.0), labels=np.ones(3)))


def test_youden_threshold_and_sensitivity_specificity():
  labels = np.array([0, 0, 0, 1, 1, 1])
  scores = np.array([0.1, 0.2, 0.6, 0.4, 0.7, 0.9])
  # Cut-offs: >=0.7 -> J 2/3; >=0.4 -> tpr 1, fpr 1/3 -> J 2/3 too: the higher one wins.
  threshold = classification_stats.youden_threshold(labels, scores)
  assert threshold == pytest.approx((0.7 + 0.6) / 2)
  sens, spec = classification_stats.sensitivity_specificity(labels, scores, threshold)
  assert (sens, spec) == (pytest.approx(2 / 3), pytest.approx(1.0))


def test_bootstrap_interval_is_seeded_and_brackets_the_auc():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 2, 60)
  scores = labels * 0.3 + rng.random(60)
  a = classification_stats.bootstrap_auc_interval(labels, scores, seed=3, num_samples=200)
  b = classification_stats.bootstrap_auc_interval(labels, scores, seed=3, num_samples=200)
  assert a == b and a[0] < classification_stats.roc_auc(scores=scores, labels=labels) < a[1]


def test_expected_calibration_error_by_hand():
  # Bin [0.2, 0.3): p 0.25 x2, observed 1/2 -> gap 0.25; bin [0.9, 1.0]: p 1.0 x2, both 1.
  labels = np.array([0, 1, 1, 1])
  probs = np.array([0.25, 0.25, 1.0, 1.0])
  assert classification_stats.expected_calibration_error(labels, probs) == pytest.approx(0.5 * 0.25)
  bins = classification_stats.reliability_bins(labels, probs)
  assert bins["count"].tolist() == [0, 0, 2, 0, 0, 0, 0, 0, 0, 2]


# ----- native resolution -----


@pytest.mark.parametrize("shape", [(97, 61), (50, 130), (512, 512)])
def test_native_resolution_round_trip(shape):
  """A mask letterboxed to the model's square and mapped back overlaps itself closely."""
  record = make_records([shape])[0]
  truth = record["mask"][..., 0]
  boxed, box = preprocess.letterbox(truth.astype(np.float32), 64)
  back = preprocess.unletterbox(boxed, box, order="bilinear") >= 0.5
  assert back.shape == shape
  from cxr_jax.core.stats import metric_table

  m = metric_table.mask_metrics(back, truth)
  assert m["dice"] > 0.97 and m["hd95_px"] <= 2 * max(shape) / 64


# ----- the command, on records made here -----


def test_evaluate_segmenter_writes_json_csv_and_report(tmp_path, fake_model):
  config = small_config()
  shapes = [(97, 61), (64, 64), (50, 130), (80, 80), (70, 90)]
  test = make_records(shapes, sources=[0, 1, 2, 0, 1])
  summary = evaluate.run_model(
    config, fake_model(), str(tmp_path), "test", {"test": test}, show_progress=False
  )
  seg = summary["segmentation"]
  assert summary["num_images"] == 5 and seg["num_images_with_mask"] == 5
  assert seg["raw"]["all"]["dice"]["mean"] > 0.9  # fake model ~ truth, scored at native size
  assert set(seg["raw"]["per_source"]) == {"montgomery", "shenzhen", "synthetic"}
  assert len(seg["raw"]["worst"]) == 5

  on_disk = json.loads((tmp_path / "eval" / "test.json").read_text())
  assert on_disk["segmentation"]["dice"] == pytest.approx(seg["dice"])
  with open(tmp_path / "eval" / "test.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(int(r["height"]), int(r["width"])) for r in rows] == shapes
  for name in (
    "id",
    "source",
    "label",
    "dice",
    "iou",
    "precision",
    "recall",
    "hd95_px",
    "asd_px",
    "hd95_mm",
    "asd_mm",
    "dice_post",
    "lung_fraction",
    "lung_fraction_post",
  ):
    assert name in rows[0]
  montgomery = [r for r in rows if r["source"] == "montgomery"]
  assert all(r["hd95_mm"] and r["spacing_estimated"] == "1" for r in montgomery)
  assert all(r["hd95_mm"] == "" for r in rows if r["source"] != "montgomery")
  assert (tmp_path / "eval" / "test_report.html").exists()


def test_evaluate_classifier_threshold_from_validation(tmp_path, fake_model):
  config = small_config()
  labels = [0, 1, 0, 1, 1, 0]
  test = make_records([(60, 50)] * 6, labels=labels, seed=1)
  validation = make_records([(50, 60)] * 6, labels=labels[::-1], seed=2)
  summary = evaluate.run_model(
    config,
    fake_model(classify=True, segment=False),
    str(tmp_path),
    "test",
    {"test": test, "validation": validation},
    show_progress=False,
  )
  c = summary["classification"]
  assert "segmentation" not in summary
  assert c["auc"] == pytest.approx(1.0)  # the drawn corner separates the classes
  assert c["threshold_from"] == "validation"
  assert c["sensitivity"] == pytest.approx(1.0) and c["specificity"] == pytest.approx(1.0)
  with open(tmp_path / "eval" / "test.csv") as f:
    rows = list(csv.DictReader(f))
  assert all(0 <= float(r["p_abnormal"]) <= 1 for r in rows) and rows[0]["dice"] == ""
  calibration = c["calibration"]
  assert calibration["temperature"] > 0 and calibration["fitted_on"] == "validation"
  temperature = calibration["temperature"]
  for r in rows:  # the calibrated column is the raw one through the fitted temperature
    expected = classification_stats.apply_temperature(
      np.array([float(r["p_abnormal"])]), temperature
    )
    assert float(r["p_abnormal_calibrated"]) == pytest.approx(float(expected[0]), abs=1e-6)
  html = (tmp_path / "eval" / "test_report.html").read_text()
  assert "ROC curve" in html and "Reliability diagram" in html
  assert (tmp_path / "eval" / "test_roc.png").exists()


def test_inference_pads_a_short_batch(fake_model):
  inference = Inference(small_config(), fake_model(), batch_size=4)
  out = inference(np.zeros((3, 32, 32, 1), np.float32))
  assert out["prob"].shape == (3, 32, 32) and inference.segments and not inference.classifies


def test_command_on_a_workdir_and_the_synthetic_dataset(tmp_path):
  """`python -m cxr_jax.evaluate`: restore, build the run's dataset, write the outputs."""

  from test_predict import make_random_workdir

  from configs import default

  config = default.get_config("smoke")
  config.data.data_dir = str(tmp_path / "tfds")
  make_random_workdir(tmp_path / "run", config)
  done = run_module(
    "cxr_jax.evaluate",
    f"--workdir={tmp_path / 'run'}",
    "--split=test",
    "--checkpoint=best",
    "--batch_size=4",
  )
  assert done.returncode == 0, done.stderr[-3000:]
  summary = json.loads((tmp_path / "run" / "eval" / "test.json").read_text())
  assert summary["step"] == 1 and summary["checkpoint"] == "best"
  assert summary["num_images"] > 0 and "segmentation" in summary
  with open(tmp_path / "run" / "eval" / "test.csv") as f:
    assert len(list(csv.DictReader(f))) == summary["num_images"]
  assert (tmp_path / "run" / "eval" / "test_report.html").exists()

  # --tta=on overrides the run's config (off here) into outputs of their own.
  done = run_module(
    "cxr_jax.evaluate", f"--workdir={tmp_path / 'run'}", "--checkpoint=best", "--tta=on"
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "test.tta_on.json" in done.stderr
  with_tta = json.loads((tmp_path / "run" / "eval" / "test.tta_on.json").read_text())
  assert json.loads((tmp_path / "run" / "eval" / "test.json").read_text()) == summary
  assert with_tta["num_images"] == summary["num_images"]
  assert with_tta["segmentation"]["dice"] != summary["segmentation"]["dice"]  # other masks


def test_temperature_scaling_calibrates_an_overconfident_model():
  """Probabilities pushed to the extremes (logit x 4) of a calibrated score: the fitted
  temperature undoes it (~4), the ECE falls, and the order (AUC) is unchanged."""
  rng = np.random.default_rng(0)
  calibrated = rng.uniform(0.02, 0.98, 4000)
  labels = rng.random(4000) < calibrated
  logit = np.log(calibrated / (1 - calibrated))
  overconfident = 1 / (1 + np.exp(-4 * logit))
  temperature = classification_stats.fit_temperature(labels[:2000], overconfident[:2000])
  assert 3.3 < temperature < 4.8
  fixed = classification_stats.apply_temperature(overconfident[2000:], temperature)
  before = classification_stats.expected_calibration_error(labels[2000:], overconfident[2000:])
  after = classification_stats.expected_calibration_error(labels[2000:], fixed)
  assert after < 0.04 < 0.1 < before
  assert classification_stats.roc_auc(fixed, labels[2000:]) == pytest.approx(
    classification_stats.roc_auc(overconfident[2000:], labels[2000:])
  )
  assert classification_stats.fit_temperature(np.ones(5, bool), overconfident[:5]) == 1.0
