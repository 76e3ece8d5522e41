"""Segment, crop to the lungs, classify."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import default
from configs import lung_crop_classifier
from cxr_jax import evaluate
from cxr_jax import predict
from cxr_jax.core.inference import inference as inference_lib
from cxr_jax.core.run import rundir
from cxr_jax.data import crops
from cxr_jax.data import datasets
from cxr_jax.data import preprocess
from cxr_jax.data import records
from cxr_jax.workflows import lung_crop
from cxr_jax.workflows import prediction
from cxr_jax.workflows import train
from tests.test_train import smoke_config


def test_mask_box_and_grow_box():
  mask = np.zeros((10, 12), bool)
  assert crops.mask_box(mask) is None
  mask[2:5, 3:9] = True
  mask[7, 1] = True
  assert crops.mask_box(mask) == (2, 1, 8, 9)
  # 10% of a 6x8 box: 1 pixel each way vertically, 1 horizontally; clipped at the border.
  assert crops.grow_box((2, 1, 8, 9), 0.1, 10, 12) == (1, 0, 9, 10)
  assert crops.grow_box((0, 0, 10, 12), 0.5, 10, 12) == (0, 0, 10, 12)


def test_cropped_source_crops_image_and_mask_alike():
  image = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30, 1)
  mask = (image > 100).astype(np.uint8)
  source = [{"id": b"a", "image": image, "mask": mask}, {"id": b"b", "image": image, "mask": mask}]
  cropped = crops.CroppedSource(source, {"a": (5, 10, 15, 20), "b": None}, margin=0.2)
  a, b = cropped[0], cropped[1]
  np.testing.assert_array_equal(a["image"], image[3:17, 8:22])
  np.testing.assert_array_equal(a["mask"], mask[3:17, 8:22])
  np.testing.assert_array_equal(b["image"], image)  # no predicted lung: kept whole
  assert len(cropped) == 2


def test_ids_decode_one_way_numpy_included():
  assert records.decode_id(b"a") == records.decode_id(np.array(b"a")) == "a"
  assert records.decode_id("a") == records.decode_id(np.array("a")) == "a"
  # A record whose id is a 0-d numpy array is cropped too (it used to be keyed "b'a'").
  image = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30, 1)
  source = [{"id": np.array(b"a"), "image": image, "mask": image}]
  cropped = crops.CroppedSource(source, {"a": (5, 10, 15, 20)}, margin=0.0)
  assert cropped[0]["image"].shape == (10, 10, 1)


class _ConstantSegmenter:
  """Stands in for inference.Inference: p(lung) = `value` everywhere."""

  segments, classifies = True, False

  def __init__(self, value: float, image_size: int = 32, batch_size: int = 4):
    self.value, self.image_size, self.batch_size = value, image_size, batch_size

  def __call__(self, images):
    prob = np.full(images.shape[:3], self.value, np.float32)
    return {"prob": prob, "uncertainty": np.asarray(inference_lib.uncertainty(prob))}


def test_segmenter_thresholds_like_predict():
  """Boxes come from inference.native_mask (p >= 0.5), not a threshold of their own (> 0.5)."""
  images = [np.zeros((50, 70), np.uint8), np.zeros((40, 30, 1), np.uint8)]
  at = lung_crop.Segmenter(_ConstantSegmenter(inference_lib.MASK_THRESHOLD), "/seg", 1)
  assert [box for _, box in at.predict(images)] == [(0, 0, 50, 70), (0, 0, 40, 30)]
  (raw, box), _ = at.predict(images)
  assert raw.shape == (50, 70) and raw.all() and box == (0, 0, 50, 70)
  below = lung_crop.Segmenter(_ConstantSegmenter(0.49), "/seg", 1)
  assert [box for _, box in below.predict(images)] == [None, None]


def test_box_cache_is_checked_against_the_segmenter(tmp_path, monkeypatch, caplog):
  seg = tmp_path / "seg"
  seg.mkdir()
  (seg / "config.json").write_text("{}")
  step = {"value": 7}
  calls = []

  def fake_compute(segmenter, source, show_progress=True):
    calls.append(segmenter.step)
    return {"a": (1, 2, 3, 4)}

  monkeypatch.setattr(lung_crop, "segmenter_step", lambda workdir: step["value"])
  monkeypatch.setattr(
    lung_crop,
    "load_segmenter",
    lambda workdir, batch_size=16: lung_crop.Segmenter(
      None, os.path.abspath(workdir), step["value"]
    ),
  )
  monkeypatch.setattr(lung_crop, "compute_lung_boxes", fake_compute)
  config = default.get_config()
  config.data.crop_to_lungs = True
  config.data.crop_workdir = os.path.relpath(seg)  # recorded as an absolute path
  cls = tmp_path / "cls"
  cache = cls / "lung_boxes_test.json"

  lung_crop.maybe_crop(config, "test", [], str(cls))
  assert calls == [7]
  record = json.loads(cache.read_text())
  assert record["seg_workdir"] == str(seg) and record["seg_step"] == 7
  lung_crop.maybe_crop(config, "test", [], str(cls))
  assert calls == [7]  # same segmenter: reused

  step["value"] = 8  # the segmentation run went on: its boxes are stale
  with caplog.at_level("INFO"):
    lung_crop.maybe_crop(config, "test", [], str(cls))
  assert calls == [7, 8] and "step 7, not 8" in caplog.text

  record = json.loads(cache.read_text())
  record["seg_workdir"] = "/another/segmentation/run"
  cache.write_text(json.dumps(record))
  lung_crop.maybe_crop(config, "test", [], str(cls))
  assert calls == [7, 8, 8]  # another segmenter's boxes: recomputed
  assert json.loads(cache.read_text())["seg_workdir"] == str(seg)
  assert not (cls / "lung_boxes_test.json.tmp").exists()


def test_crop_classifier_needs_a_segmentation_workdir(tmp_path):
  config = smoke_config("classifier", tmp_path / "tfds")
  config.data.crop_to_lungs = True
  with pytest.raises(ValueError, match="crop_workdir"):
    train.train_and_evaluate(config, str(tmp_path / "cls"))
  config.data.crop_workdir = str(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="segmentation"):
    train.train_and_evaluate(config, str(tmp_path / "cls"))


def test_segment_crop_classify_end_to_end(tmp_path):
  data_dir = tmp_path / "tfds"
  seg = tmp_path / "seg"
  train.train_and_evaluate(smoke_config("unet", data_dir), str(seg))

  config = lung_crop_classifier.get_config("smoke")
  config.data.data_dir = str(data_dir)
  config.data.crop_workdir = str(seg)
  cls = tmp_path / "cls"
  val = train.train_and_evaluate(config, str(cls))
  assert 0.0 <= val["accuracy"] <= 1.0

  boxes = json.loads((cls / "lung_boxes_train.json").read_text())
  assert boxes["seg_workdir"] == str(seg)
  for box in boxes["boxes"].values():
    if box is not None:
      top, left, bottom, right = box
      assert 0 <= top < bottom and 0 <= left < right

  # evaluate crops the test split the same way and scores the classifier.
  summary = evaluate.run(str(cls), "test", show_progress=False)
  assert (cls / "lung_boxes_test.json").exists()
  assert (cls / "eval" / "test.json").exists()
  assert "classification" in json.dumps(summary) or "auc" in json.dumps(summary)

  # predict feeds the crop classifier lung crops, as in training.
  images = tmp_path / "images"
  images.mkdir()
  builder = datasets.load_builder(
    "synthetic", data_dir=str(data_dir), synthetic_examples=int(config.data.synthetic_examples)
  )
  source = builder.as_data_source("test")  # native, uncropped images
  for k in range(3):
    Image.fromarray(source[k]["image"][..., 0]).save(images / f"x{k}.png")
  out = tmp_path / "out"
  assert predict.run(str(cls), str(images), str(out), show_progress=False) == 0
  with open(out / "predictions.csv") as f:
    rows = {r["image"]: r for r in csv.DictReader(f)}
  assert len(rows) == 3 and all(0 <= float(r["p_abnormal"]) <= 1 for r in rows.values())

  # The same numbers by hand: segment, box, grow, crop, classify.
  cls_config, cls_model, _ = rundir.restore_model(str(cls), "latest")
  inference = inference_lib.Inference(cls_config, cls_model, batch_size=3)
  segmenter = lung_crop.load_segmenter(str(seg), batch_size=3)
  native = [prediction.load_image(images / f"x{k}.png")[0] for k in range(3)]
  boxes = [box for _, box in segmenter.predict(native)]
  assert any(b is not None for b in boxes)
  cropped, whole = [], []
  for image, box in zip(native, boxes):
    if box is not None:
      top, left, bottom, right = crops.grow_box(box, cls_config.data.crop_margin, *image.shape)
      image_crop = image[top:bottom, left:right]
    else:
      image_crop = image
    cropped.append(preprocess.prepare_image(image_crop, inference.image_size)[0])
    whole.append(preprocess.prepare_image(image, inference.image_size)[0])
  p_crop = inference(np.stack(cropped)[..., None])["p_abnormal"]
  p_whole = inference(np.stack(whole)[..., None])["p_abnormal"]
  got = np.array([float(rows[f"x{k}.png"]["p_abnormal"]) for k in range(3)])
  np.testing.assert_allclose(got, p_crop, atol=2e-6)
  if np.abs(p_crop - p_whole).max() > 1e-5:  # the crop changes what the classifier sees
    assert np.abs(got - p_whole).max() > 1e-6
  for k, (image, box) in enumerate(zip(native, boxes)):  # masks: the segmenter's lungs
    mask = np.asarray(Image.open(out / "masks" / f"x{k}.png")) > 0
    assert mask.shape == image.shape
    written = "lung_fraction_post" if cls_config.get("postprocess", False) else "lung_fraction"
    assert float(rows[f"x{k}.png"][written]) == pytest.approx(mask.mean(), abs=1e-5)
    if box is not None:
      assert crops.mask_box(mask) is not None
