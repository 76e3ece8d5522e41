"""Letterbox geometry, the map back to native size, and normalisation on bad input."""

import numpy as np
import pytest

from cxr_jax.data import preprocess


def _ellipse(height: int, width: int) -> np.ndarray:
  yy, xx = np.mgrid[:height, :width]
  inside = ((yy - height / 2) / (height * 0.35)) ** 2 + ((xx - width * 0.45) / (width * 0.3)) ** 2
  return (inside < 1).astype(np.uint8)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
  return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize(
  "shape,size",
  [
    ((512, 400), 128),  # downscale, portrait
    ((300, 420), 128),  # downscale, landscape
    ((24, 36), 64),  # upscale
  ],
)
def test_mask_round_trip_to_native_size(shape, size):
  mask = _ellipse(*shape)
  boxed = preprocess.prepare_mask(mask[..., None], size)
  assert boxed.shape == (size, size) and set(np.unique(boxed)) <= {0.0, 1.0}
  _, box = preprocess.letterbox(mask, size, order="nearest")
  back = preprocess.unletterbox(boxed, box, order="bilinear") > 0.5
  assert back.shape == shape
  assert _iou(back, mask > 0) > 0.98
  nearest = preprocess.unletterbox(boxed.astype(np.uint8), box, order="nearest")
  assert nearest.dtype == np.uint8 and _iou(nearest > 0, mask > 0) > 0.95


def test_letterbox_keeps_aspect_and_centres():
  image = np.full((100, 50, 1), 200, np.uint8)
  out, box = preprocess.letterbox(image, 64, pad_value=7)
  assert out.shape == (64, 64) and box.content_shape(64) == (64, 32)
  assert (box.pad_top, box.pad_left, box.height, box.width) == (0, 16, 100, 50)
  assert box.scale == pytest.approx(0.64)
  assert np.all(out[:, :16] == 7) and np.all(out[:, 48:] == 7) and np.all(out[:, 16:48] == 200)
  # Multi-channel predictions map back channel by channel.
  back = preprocess.unletterbox(np.ones((64, 64, 2), np.float32), box)
  assert back.shape == (100, 50, 2)


def test_normalise_ignores_burnt_in_text_and_borders():
  rng = np.random.default_rng(0)
  anatomy = rng.normal(120, 20, (64, 64)).clip(1, 254)
  framed = np.zeros((80, 80))
  framed[8:72, 8:72] = anatomy
  framed[10:14, 10:30] = 255  # burnt-in text
  a = preprocess.normalise(anatomy.astype(np.uint8))
  b = preprocess.normalise(framed.astype(np.uint8))[8:72, 8:72]
  inside = np.ones((64, 64), bool)
  inside[2:6, 2:22] = False
  # The border and the text barely change how the anatomy is scaled.
  assert np.abs(a[inside] - b[inside]).mean() < 0.05
  assert abs(b[inside].mean()) < 0.1 and abs(b[inside].std() - 1) < 0.1


@pytest.mark.parametrize(
  "image",
  [
    np.zeros((1, 1), np.uint8),  # 1x1
    np.zeros((300, 200), np.uint8),  # all black
    np.full((40, 40, 1), 255, np.uint8),  # all white
    (np.arange(8000 * 8000, dtype=np.uint32) % 251).astype(np.uint8).reshape(8000, 8000),
    np.linspace(0, 65535, 50 * 70).reshape(50, 70).astype(np.uint16),  # 16-bit
    np.linspace(-3, 3, 30 * 20).reshape(30, 20),  # float64
    np.eye(12, dtype=bool),
  ],
  ids=["1x1", "black", "white", "8000x8000", "uint16", "float64", "bool"],
)
def test_prepare_image_handles_odd_inputs(image):
  out, box = preprocess.prepare_image(image, 32)
  assert out.shape == (32, 32) and out.dtype == np.float32
  assert np.all(np.isfinite(out))
  assert (box.height, box.width) == image.shape[:2]


@pytest.mark.parametrize(
  "image,error",
  [
    (np.zeros((10, 10, 3), np.uint8), "one grey channel"),
    (np.zeros((0, 5), np.uint8), "empty"),
    (np.array([["a"]]), "dtype"),
    (np.full((4, 4), np.nan), "NaN"),
  ],
)
def test_bad_input_raises_clear_errors(image, error):
  with pytest.raises((ValueError, TypeError), match=error):
    preprocess.prepare_image(image, 32)
