"""Segment, crop to the lungs, classify."""

import json

import numpy as np
import pytest

from configs import lung_crop_classifier
from cxr_jax import evaluate
from cxr_jax import train
from cxr_jax.data import lung_crop
from tests.test_train import smoke_config


def test_mask_box_and_grow_box():
  mask = np.zeros((10, 12), bool)
  assert lung_crop.mask_box(mask) is None
  mask[2:5, 3:9] = True
  mask[7, 1] = True
  assert lung_crop.mask_box(mask) == (2, 1, 8, 9)
  # 10% of a 6x8 box: 1 pixel each way vertically, 1 horizontally; clipped at the border.
  assert lung_crop.grow_box((2, 1, 8, 9), 0.1, 10, 12) == (1, 0, 9, 10)
  assert lung_crop.grow_box((0, 0, 10, 12), 0.5, 10, 12) == (0, 0, 10, 12)


def test_cropped_source_crops_image_and_mask_alike():
  image = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30, 1)
  mask = (image > 100).astype(np.uint8)
  source = [{"id": b"a", "image": image, "mask": mask}, {"id": b"b", "image": image, "mask": mask}]
  cropped = lung_crop.CroppedSource(source, {"a": (5, 10, 15, 20), "b": None}, margin=0.2)
  a, b = cropped[0], cropped[1]
  np.testing.assert_array_equal(a["image"], image[3:17, 8:22])
  np.testing.assert_array_equal(a["mask"], mask[3:17, 8:22])
  np.testing.assert_array_equal(b["image"], image)  # no predicted lung: kept whole
  assert len(cropped) == 2


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
  summary = evaluate.evaluate(str(cls), "test", progress=False)
  assert (cls / "lung_boxes_test.json").exists()
  assert (cls / "eval" / "test.json").exists()
  assert "classification" in json.dumps(summary) or "auc" in json.dumps(summary)
