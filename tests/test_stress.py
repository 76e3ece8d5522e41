"""Stress tests of diseased lungs (data/stress.py) and the area ratio: the change itself, the
source that carries it, and `evaluate --stress` scoring a model that takes dark for lung."""

import json

import numpy as np
import pytest
from scipy import ndimage

from cxr_jax import errors
from cxr_jax import evaluate
from cxr_jax.core.stats import metric_table
from cxr_jax.data import stress
from tests.test_evaluate import small_config


def chest(h=120, w=100, seed=0):
  """A radiograph-like image: two dark (aerated) lungs in bright tissue, and their mask."""
  rows, cols = np.mgrid[:h, :w]
  mask = np.zeros((h, w), np.uint8)
  for cx in (0.3, 0.7):
    mask |= ((rows - 0.5 * h) / (0.35 * h)) ** 2 + ((cols - cx * w) / (0.15 * w)) ** 2 <= 1
  noise = np.random.default_rng(seed).integers(0, 20, (h, w))
  image = np.clip(200 - 150 * mask + noise, 0, 255).astype(np.uint8)
  return image, mask


def test_consolidation_brightens_the_lung_bases_only():
  image, mask = chest()
  for seed in range(20):
    out = stress.consolidate(image, mask, seed)
    assert out.dtype == np.uint8 and out.shape == image.shape
    changed = out != image
    near_lungs = ndimage.binary_dilation(mask, np.ones((3, 3)), iterations=3)
    assert changed.any() and not (changed & ~near_lungs).any()  # the lungs and their rim
    assert (out >= image).all()  # never darker
    rows = np.flatnonzero(mask.any(axis=1))
    top, bottom = rows[0], rows[-1]
    upper = mask.astype(bool) & (np.arange(image.shape[0]) < top + 0.4 * (bottom - top))[:, None]
    lower = mask.astype(bool) & (np.arange(image.shape[0]) > bottom - 0.2 * (bottom - top))[:, None]
    gain = out.astype(float) - image
    assert gain[lower].mean() > 40 and gain[upper].mean() < 5
  # One lung or both: over 20 ids, both kinds happen.
  sides = set()
  for seed in range(20):
    gain = stress.consolidate(image, mask, seed).astype(float) - image
    sides.add((gain[:, :50].max() > 40, gain[:, 50:].max() > 40))
  assert {(True, True), (True, False), (False, True)} <= sides


def test_consolidation_is_drawn_from_the_seed_and_keeps_shapes():
  image, mask = chest()
  a, b = stress.consolidate(image, mask, 3), stress.consolidate(image, mask, 3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, stress.consolidate(image, mask, 4))
  with_channel = stress.consolidate(image[..., None], mask[..., None], 3)
  np.testing.assert_array_equal(with_channel[..., 0], a)
  no_lung = stress.consolidate(image, np.zeros_like(mask), 3)
  np.testing.assert_array_equal(no_lung, image)


def test_stressed_source_changes_masked_images_by_id():
  image, mask = chest()
  records = [
    {"id": b"a", "image": image[..., None], "mask": mask[..., None], "has_mask": True},
    {"id": b"b", "image": image[..., None], "mask": mask[..., None], "has_mask": True},
    {
      "id": b"c",
      "image": image[..., None],
      "mask": np.zeros_like(mask)[..., None],
      "has_mask": False,
    },
  ]
  source = stress.StressedSource(records, "consolidation")
  reversed_source = stress.StressedSource(records[::-1], "consolidation")
  assert len(source) == 3
  np.testing.assert_array_equal(source[0]["image"], reversed_source[2]["image"])  # by id
  assert not np.array_equal(source[0]["image"], source[1]["image"])  # ids differ
  np.testing.assert_array_equal(source[0]["mask"], mask[..., None])  # the reference kept
  np.testing.assert_array_equal(source[2]["image"], image[..., None])  # no mask: unchanged
  np.testing.assert_array_equal(records[0]["image"], image[..., None])  # the source untouched
  with pytest.raises(errors.ConfigError, match="consolidation"):
    stress.StressedSource(records, "snow")


def test_area_ratio():
  truth = np.zeros((10, 10), bool)
  truth[2:8, 2:8] = True
  half = truth.copy()
  half[5:] = False
  assert metric_table.mask_metrics(half, truth)["area_ratio"] == pytest.approx(0.5)
  assert metric_table.mask_metrics(truth, truth)["area_ratio"] == 1.0
  assert metric_table.mask_metrics(~np.ones_like(truth), ~np.ones_like(truth))["area_ratio"] == 1.0


def test_evaluate_stress_misses_the_bases_of_a_dark_is_lung_model(tmp_path, fake_model):
  """A model that calls dark pixels lung (what a recipe learns of aerated lung) scores well
  on the images as they are and misses the consolidated bases: its area ratio falls below 1,
  written under test.stress_consolidation.* beside the untouched test.*."""
  config = small_config()
  records = []
  for k in range(6):
    image, mask = chest(96 + 8 * k, 80, seed=k)
    records.append(
      {
        "image": image[..., None],
        "mask": mask[..., None],
        "has_mask": True,
        "label": 0,
        "source": 2,
        "id": f"case{k}".encode(),
        "spacing_mm": np.zeros(2, np.float32),
        "spacing_estimated": 0,
      }
    )
  model = fake_model()
  model.gain[...] = -model.gain[...]  # dark is lung
  clean = evaluate.run_model(
    config, model, str(tmp_path), "test", {"test": records}, show_progress=False
  )
  stressed = evaluate.run_model(
    config,
    model,
    str(tmp_path),
    "test",
    {"test": records},
    show_progress=False,
    stress="consolidation",
  )
  seg, seg_stressed = clean["segmentation"]["raw"]["all"], stressed["segmentation"]["raw"]["all"]
  assert seg["dice"]["mean"] > 0.9 and seg["area_ratio"]["median"] == pytest.approx(1.0, abs=0.1)
  assert seg_stressed["area_ratio"]["median"] < 0.9
  assert seg_stressed["dice"]["mean"] < seg["dice"]["mean"] - 0.03
  on_disk = json.loads((tmp_path / "eval" / "test.stress_consolidation.json").read_text())
  assert on_disk["stress"]["kind"] == "consolidation"
  assert json.loads((tmp_path / "eval" / "test.json").read_text())["segmentation"]["dice"] == (
    pytest.approx(clean["segmentation"]["dice"])
  )
  assert (tmp_path / "eval" / "test.stress_consolidation.csv").exists()
  assert evaluate.output_name("test", "on", "consolidation") == "test.tta_on.stress_consolidation"
