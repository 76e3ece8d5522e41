"""Native-resolution mask metrics against hand-computed cases, empty and one-pixel included."""

import math

import numpy as np
import pytest

from cxr_jax.core.stats import metric_table
from cxr_jax.core.stats import surface


def _pixels(shape, *points) -> np.ndarray:
  mask = np.zeros(shape, bool)
  for r, c in points:
    mask[r, c] = True
  return mask


def test_overlap_of_two_rectangles():
  pred = np.zeros((5, 5), np.uint8)
  pred[0:2, 0:2] = 1  # 4 px, all inside the truth
  truth = np.zeros((5, 5), np.uint8)
  truth[0:2, 0:3] = 255  # 6 px: any nonzero value is lung
  m = surface.overlap_metrics(pred, truth)
  assert m["dice"] == pytest.approx(0.8)  # 2*4 / (4+6)
  assert m["iou"] == pytest.approx(4 / 6)
  assert m["precision"] == pytest.approx(1.0)
  assert m["recall"] == pytest.approx(4 / 6)


def test_both_empty_is_perfect():
  empty = np.zeros((7, 9), bool)
  m = metric_table.mask_metrics(empty, empty, (0.5, 0.5))
  assert [m[k] for k in ("dice", "iou", "precision", "recall")] == [1.0] * 4
  assert [m[k] for k in ("hd95_px", "asd_px", "hd95_mm", "asd_mm")] == [0.0] * 4


@pytest.mark.parametrize("empty_side", ["pred", "truth"])
def test_one_empty_scores_zero_overlap_and_the_diagonal(empty_side):
  empty, full = np.zeros((7, 9), bool), _pixels((7, 9), (3, 3))
  pred, truth = (empty, full) if empty_side == "pred" else (full, empty)
  m = metric_table.mask_metrics(pred, truth, (2.0, 1.0))
  assert [m[k] for k in ("dice", "iou", "precision", "recall")] == [0.0] * 4
  assert m["hd95_px"] == m["asd_px"] == pytest.approx(math.hypot(6, 8))  # 10 px
  assert m["hd95_mm"] == m["asd_mm"] == pytest.approx(math.hypot(12, 8))


def test_one_pixel_masks():
  same = metric_table.mask_metrics(_pixels((5, 6), (1, 1)), _pixels((5, 6), (1, 1)))
  assert same["dice"] == 1.0 and same["hd95_px"] == 0.0 and same["asd_px"] == 0.0
  apart = metric_table.mask_metrics(_pixels((5, 6), (1, 1)), _pixels((5, 6), (1, 4)))
  assert apart["dice"] == 0.0
  assert apart["hd95_px"] == pytest.approx(3.0) and apart["asd_px"] == pytest.approx(3.0)
  assert math.isnan(apart["hd95_mm"])  # no spacing: unknown, not zero


def test_pixel_inside_a_square():
  # Truth: a 3x3 square, boundary = its 8-pixel ring; prediction: the centre pixel.
  # pred->truth: [1]; truth->pred: 4 edge pixels at 1, 4 corners at sqrt(2).
  truth = np.zeros((5, 5), bool)
  truth[1:4, 1:4] = True
  pred = _pixels((5, 5), (2, 2))
  m = metric_table.mask_metrics(pred, truth)
  assert m["dice"] == pytest.approx(0.2)
  assert m["hd95_px"] == pytest.approx(math.sqrt(2))  # max(P95([1]), P95(truth->pred))
  assert m["asd_px"] == pytest.approx((1 + 4 + 4 * math.sqrt(2)) / 9)  # pooled over 1 + 8


def test_a_false_island_counts_in_hd95_and_assd():
  """The conventions of MONAI / surface-distance: the larger directed 95th percentile, and
  the pooled mean. A pooled HD95 would give 2.2 here, the mean of directed means 0.61."""
  truth = np.zeros((15, 20), bool)
  truth[1:4, 1:4] = True  # boundary: 8 pixels
  pred = truth.copy()
  pred[2, 14] = True  # an island 11 px right of the square's edge: 1 of pred's 9 boundary px
  m = surface.surface_metrics(pred, truth)
  # pred->truth sorted: eight 0s then 11; P95 sits at 7.6 -> 0.6 * 11. truth->pred: all 0.
  assert m["hd95"] == pytest.approx(6.6)
  assert m["asd"] == pytest.approx(11 / 17)


def test_anisotropic_spacing():
  across = surface.surface_metrics(_pixels((6, 6), (1, 1)), _pixels((6, 6), (1, 4)), (0.5, 2.0))
  down = surface.surface_metrics(_pixels((6, 6), (1, 1)), _pixels((6, 6), (4, 1)), (0.5, 2.0))
  assert across["hd95"] == pytest.approx(6.0) and down["hd95"] == pytest.approx(1.5)


def test_cropped_distances_match_brute_force():
  rng = np.random.default_rng(0)
  for _ in range(5):
    pred = np.zeros((30, 40), bool)
    truth = np.zeros((30, 40), bool)
    for mask in (pred, truth):
      r, c = rng.integers(2, 20), rng.integers(2, 30)
      mask[r : r + rng.integers(2, 9), c : c + rng.integers(2, 9)] = True
    d_pred, d_truth = surface.surface_distances(pred, truth)
    bp, bt = np.argwhere(surface.boundary(pred)), np.argwhere(surface.boundary(truth))
    pairwise = np.linalg.norm(bp[:, None, :] - bt[None, :, :], axis=-1)
    np.testing.assert_allclose(np.sort(d_pred), np.sort(pairwise.min(1)))
    np.testing.assert_allclose(np.sort(d_truth), np.sort(pairwise.min(0)))


def test_masks_of_different_shapes_are_refused():
  with pytest.raises(ValueError, match="native_mask"):
    surface.overlap_metrics(np.zeros((4, 4)), np.zeros((4, 5)))


def test_pixel_spacing_is_the_kaggle_readers():
  from cxr_jax.data import kaggle

  assert kaggle.pixel_spacing("montgomery", 4892, 4020) == ((0.0875, 0.0875), False)
  (row_mm, col_mm), estimated = kaggle.pixel_spacing("montgomery", 512, 512)
  assert estimated
  assert row_mm == pytest.approx(0.0875 * 4892 / 512)
  assert col_mm == pytest.approx(0.0875 * 4020 / 512)
  assert kaggle.pixel_spacing("shenzhen", 512, 512) == ((0.0, 0.0), False)


def test_aggregate_summaries_per_source_and_worst():
  rows = [
    {"id": "a", "source": "montgomery", "dice": 0.9, "hd95_mm": 4.0},
    {"id": "b", "source": "montgomery", "dice": 0.5, "hd95_mm": 10.0},
    {"id": "c", "source": "shenzhen", "dice": 0.7, "hd95_mm": math.nan},
    {"id": "d", "source": "shenzhen", "dice": 0.8, "hd95_mm": math.nan},
  ]
  agg = surface.aggregate(rows, metrics=("dice", "hd95_mm"), num_worst=2)
  assert agg["all"]["dice"]["mean"] == pytest.approx(0.725)
  assert agg["all"]["dice"]["median"] == pytest.approx(0.75)
  assert agg["all"]["dice"]["std"] == pytest.approx(np.std([0.9, 0.5, 0.7, 0.8]))
  assert agg["all"]["hd95_mm"]["count"] == 2  # NaN (unknown spacing) is left out
  assert list(agg["per_source"]) == ["montgomery", "shenzhen"]
  assert agg["per_source"]["shenzhen"]["dice"]["mean"] == pytest.approx(0.75)
  assert math.isnan(agg["per_source"]["shenzhen"]["hd95_mm"]["mean"])
  assert [w["id"] for w in agg["worst"]] == ["b", "c"]
  worst_hd = surface.aggregate(
    rows, metrics=("hd95_mm",), num_worst=1, rank_by="hd95_mm", higher_is_better=False
  )
  assert worst_hd["worst"][0]["id"] == "b"


def test_one_overlap_implementation():
  """surface's overlap scores are metrics.binary_scores' (same empty-mask convention)."""
  from cxr_jax.core.stats import metrics

  rng = np.random.default_rng(0)
  pred, truth = rng.random((2, 3, 9, 11)) > 0.6
  pred[1] = False  # nothing predicted, truth not empty: precision 0/0 -> 0
  pred[2] = truth[2] = False  # both empty -> 1
  expected = metrics.binary_scores(pred, truth)
  for k in range(3):
    got = surface.overlap_metrics(pred[k], truth[k])
    assert got == {name: pytest.approx(float(v[k])) for name, v in expected.items()}
