"""Post-processing on drawn masks: blobs kept or dropped, holes filled."""

import numpy as np

from cxr_jax.core.inference import postprocess


def _three_blobs_and_a_hole() -> np.ndarray:
  mask = np.zeros((40, 60), bool)
  mask[5:35, 5:25] = True  # left lung, 600 px ...
  mask[15:20, 10:15] = False  # ... with a 25 px hole
  mask[5:30, 35:55] = True  # right lung, 500 px
  mask[36:39, 56:59] = True  # a 9 px speck
  return mask


def test_keeps_two_largest_and_fills_hole():
  cleaned = postprocess.clean_mask(_three_blobs_and_a_hole())
  expected = np.zeros((40, 60), bool)
  expected[5:35, 5:25] = True
  expected[5:30, 35:55] = True
  np.testing.assert_array_equal(cleaned, expected)


def test_components_touching_at_a_corner_are_one():
  mask = np.zeros((10, 10), bool)
  mask[2, 2] = mask[3, 3] = True  # diagonal neighbours: one component of 2 px
  mask[7, 7] = True
  mask[0, 9] = True
  kept = postprocess.keep_largest_components(mask, 1)
  assert kept.sum() == 2 and kept[2, 2] and kept[3, 3]


def test_fewer_components_than_kept_is_identity_and_empty_stays_empty():
  one = np.zeros((8, 8), bool)
  one[2:5, 2:5] = True
  np.testing.assert_array_equal(postprocess.clean_mask(one), one)
  assert not postprocess.clean_mask(np.zeros((8, 8), np.uint8)).any()


def test_hole_open_to_the_border_is_not_filled():
  mask = np.ones((10, 10), bool)
  mask[4:6, 0:5] = False  # a notch reaching the left edge: background, not a hole
  np.testing.assert_array_equal(postprocess.fill_holes(mask), mask)
