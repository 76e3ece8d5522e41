"""overlay(): colours where they should be, shapes and dtypes."""

import numpy as np
import pytest

from cxr_jax.core.inference import overlays


def test_overlay_colours():
  image = np.linspace(-2.0, 3.0, 64, dtype=np.float32).reshape(8, 8)  # normalised floats
  pred = np.zeros((8, 8), bool)
  pred[2:6, 2:6] = True
  true = np.zeros((8, 8, 1), np.float32)
  true[3:7, 3:7] = 1.0
  rgb = overlays.overlay(image, pred, true, thickness=1)
  assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
  assert tuple(rgb[2, 2]) == overlays.PRED_RGB  # predicted outline
  assert tuple(rgb[6, 6]) == overlays.TRUE_RGB  # true outline, drawn on top
  assert tuple(rgb[3, 3]) == overlays.TRUE_RGB
  inside = rgb[4, 4].astype(int)  # predicted interior: grey tinted red
  assert inside[0] > inside[1] == inside[2]
  assert rgb[0, 0, 0] == rgb[0, 0, 1] == rgb[0, 0, 2] == 0  # untouched grey, min -> 0
  assert tuple(rgb[7, 7]) == (255, 255, 255)  # max -> white


def test_overlay_uint8_without_truth_and_errors():
  image = np.full((4, 5), 100, np.uint8)
  rgb = overlays.overlay(image, np.zeros((4, 5), np.uint8))
  assert np.all(rgb == 100)  # nothing predicted, no truth: the image, grey
  with pytest.raises(ValueError, match="must match"):
    overlays.overlay(image, np.zeros((5, 4), bool))
