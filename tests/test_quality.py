"""Test-time augmentation and the per-mask uncertainty behind quality control."""

import csv

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cxr_jax import predict
from cxr_jax.core.inference import inference
from cxr_jax.workflows import split_summaries
from tests.test_predict import _config
from tests.test_predict import _lungs


def test_tta_views_map_back_to_the_input():
  """Through an identity 'model' every view returns to where it came from: on a linear ramp
  bilinear sampling is exact, so the average equals the input wherever no view left the
  square (a wrong inverse would shift or zoom it)."""
  size = 64
  rows, cols = np.mgrid[:size, :size].astype(np.float32)
  images = np.stack([0.01 * rows + 0.02 * cols, 0.03 * rows - 0.01 * cols])[..., None]
  averaged = np.asarray(inference.tta_probability(lambda x: x[..., 0], jnp.asarray(images)))
  inner = slice(8, size - 8)
  np.testing.assert_allclose(averaged[:, inner, inner], images[:, inner, inner, 0], atol=1e-5)
  # The identity view's probability handed in (inference has it already) changes nothing.
  reused = inference.tta_probability(
    lambda x: x[..., 0], jnp.asarray(images), identity=jnp.asarray(images[..., 0])
  )
  np.testing.assert_allclose(np.asarray(reused), averaged, atol=1e-6)


def test_uncertainty_grows_with_the_uncertain_band():
  size = 64
  rows, cols = np.mgrid[:size, :size]
  distance = np.maximum(np.abs(rows - 32), np.abs(cols - 32)) - 16.5  # < 0 inside a square
  sharp = 1 / (1 + np.exp(distance / 0.1))
  soft = 1 / (1 + np.exp(distance / 2.0))
  softer = 1 / (1 + np.exp(distance / 4.0))
  u = np.asarray(inference.uncertainty(jnp.asarray(np.stack([sharp, soft, softer]))))
  assert u[0] < 0.02 < 0.1 < u[1] < u[2]
  assert float(inference.uncertainty(jnp.zeros((1, 8, 8)))[0]) == 1.0  # no lung found


def test_quality_summary_ranks_the_poor_masks():
  rows = [
    {"id": f"x{i}", "has_mask": 1, "dice": d, "uncertainty": u, "flagged": int(u > 0.2)}
    for i, (d, u) in enumerate([(0.98, 0.05), (0.97, 0.1), (0.90, 0.3), (0.93, 0.25), (0.96, 0.4)])
  ] + [{"id": "nomask", "has_mask": 0, "uncertainty": 0.5, "flagged": 1}]
  summary = split_summaries.quality_summary(rows, threshold=0.2)
  assert summary["num_poor"] == 2 and summary["num_flagged"] == 4
  assert summary["flagged"] == ["x2", "x3", "x4", "nomask"] and summary["flagged_poor"] == 2
  # poor (0.3, 0.25) vs fine (0.05, 0.1, 0.4): 4 of 6 pairs ranked right
  assert summary["auroc"] == pytest.approx(4 / 6)


@pytest.mark.parametrize("tta", [False, True])
def test_predict_flags_the_uncertain_mask(tmp_path, fake_model, tta):
  """A blurry model's mask is flagged, a sharp one's is not; with TTA the masks stay right."""
  Image.fromarray((_lungs(120, 100) * 255).astype(np.uint8)).save(tmp_path / "x.png")
  rows = {}
  for name, gain in (("sharp", 8.0), ("blurry", 0.3)):
    config = _config()
    config.tta = tta
    config.qc_threshold = 0.3
    model = fake_model()
    model.gain.value = jnp.asarray(gain)
    out = tmp_path / name
    status = predict.run_model(
      config, model, str(tmp_path / "x.png"), str(out), show_progress=False
    )
    assert status == 0
    with open(out / "predictions.csv") as f:
      rows[name] = next(csv.DictReader(f))
    mask = np.asarray(Image.open(out / "masks" / "x.png")) > 0
    truth = _lungs(120, 100) > 0.5
    assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.9
  assert float(rows["sharp"]["uncertainty"]) < 0.3 < float(rows["blurry"]["uncertainty"])
  assert (rows["sharp"]["flagged"], rows["blurry"]["flagged"]) == ("0", "1")
