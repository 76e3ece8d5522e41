"""Paired augmentation: image and mask stay aligned, draws are reproducible, off is identity."""

import functools

import jax
import numpy as np
import pytest

from configs import default
from cxr_jax.config import schema
from cxr_jax.core.training import augment

SIZE = 64
BATCH = 3
THRESHOLD = 0.5
# Strong settings, one geometric transform at a time (and all together).
GEOMETRIC = {
  "rotate": dict(rotate_deg=40.0),
  "scale": dict(scale=0.4),
  "shift": dict(shift=0.2),
  "shear": dict(shear_deg=25.0),
  "hflip": dict(hflip=True),
  "elastic": dict(elastic_alpha=5.0, elastic_sigma=6.0),
  "all": dict(
    rotate_deg=40.0,
    scale=0.4,
    shift=0.2,
    shear_deg=25.0,
    hflip=True,
    elastic_alpha=5.0,
    elastic_sigma=6.0,
  ),
}


def _blobs() -> tuple[np.ndarray, np.ndarray]:
  """Off-centre, asymmetric bright blobs (smooth edges) and masks = their bright region."""
  yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
  images = []
  for i in range(BATCH):
    ry, rx = 20 + 2 * i, 13 + i  # lung-sized: the mask's edge is a small part of its area
    r = np.sqrt(((yy - 30) / ry) ** 2 + ((xx - 28 - 2 * i) / rx) ** 2)
    images.append(np.clip(1.5 - r, 0, 1))  # 1 inside, ramps to 0 over the edge
  image = np.stack(images)[..., None].astype(np.float32)
  return image, (image > THRESHOLD).astype(np.float32)


def _strong(name: str) -> augment.AugParams:
  """GEOMETRIC[name] alone: every other transform off."""
  off = {k: False if isinstance(v, bool) else 0.0 for k, v in default.get_config().aug.items()}
  return augment.AugParams(**{**off, "enabled": True, "elastic_sigma": 8.0, **GEOMETRIC[name]})


def _iou(a: np.ndarray, b: np.ndarray) -> float:
  return float((a & b).sum() / max((a | b).sum(), 1))


@functools.cache
def _jitted(name: str):
  params = _strong(name)
  return jax.jit(functools.partial(augment.augment_batch, aug_config=params))


@pytest.mark.parametrize("name", list(GEOMETRIC))
def test_geometric_transforms_keep_image_and_mask_aligned(name):
  image, mask = _blobs()
  out_image, out_mask = map(np.asarray, _jitted(name)(jax.random.key(1), image, mask))
  assert out_image.shape == image.shape and out_mask.shape == mask.shape
  assert set(np.unique(out_mask)) <= {0.0, 1.0}
  moved = 0
  for i in range(BATCH):
    bright = out_image[i, ..., 0] > THRESHOLD
    assert _iou(bright, out_mask[i, ..., 0] > 0) > 0.95, (name, i)
    moved += _iou(out_mask[i, ..., 0] > 0, mask[i, ..., 0] > 0) < 0.97
  if name != "hflip":  # a flip is a coin toss per example
    assert moved >= 2, f"{name}: the transform barely moved the masks"


def test_deterministic_for_a_key_and_differs_between_keys():
  image, mask = _blobs()
  fn = _jitted("all")
  a = fn(jax.random.key(3), image, mask)
  b = fn(jax.random.key(3), image, mask)
  c = fn(jax.random.key(4), image, mask)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.allclose(a[0], c[0])
  # One key per example: identical inputs get different draws within a batch.
  same = np.repeat(image[:1], BATCH, 0), np.repeat(mask[:1], BATCH, 0)
  out = np.asarray(fn(jax.random.key(3), *same)[0])
  assert not np.allclose(out[0], out[1])


def test_disabled_is_exact_identity():
  config = default.get_config().aug
  config.enabled = False
  image, mask = _blobs()
  out_image, out_mask = jax.jit(functools.partial(augment.augment_batch, aug_config=config))(
    jax.random.key(0), image, mask
  )
  np.testing.assert_array_equal(out_image, image)
  np.testing.assert_array_equal(out_mask, mask)


def test_intensity_changes_image_only_and_stays_finite():
  config = default.get_config().aug
  for key in ("rotate_deg", "scale", "shift", "shear_deg"):
    config[key] = 0.0
  config.update(brightness=0.5, contrast=0.5, gamma=0.5, noise_std=0.1, blur_sigma=2.0)
  rng = np.random.default_rng(0)
  image = rng.normal(size=(BATCH, SIZE, SIZE, 1)).astype(np.float32)  # normalised: signed
  image[0] = 0.0  # a constant (all-black) image must not give NaN
  mask = (image > 0).astype(np.float32)
  out_image, out_mask = augment.augment_batch(jax.random.key(0), image, mask, config)
  np.testing.assert_array_equal(out_mask, mask)
  assert np.all(np.isfinite(out_image))
  assert not np.allclose(out_image, image)


def test_default_config_accepted_and_bad_strength_rejected_by_the_schema():
  params = augment.AugParams.from_config(default.get_config().aug)
  assert params.enabled and not params.hflip and params.rotate_deg == 10.0
  config = default.get_config()
  config.aug.scale = 1.5
  with pytest.raises(ValueError, match=r"config.aug.scale=1.5 must be \[0, 1\)"):
    schema.validate(config)


def test_a_soft_mask_moves_with_the_same_draw():
  """The mean teacher's target: a soft mask given beside the pair is moved by the same
  geometry (bilinear), and giving it changes neither image nor mask."""
  image, mask = _blobs()
  soft = np.clip(image, 0, 1)  # a smooth p(lung) whose 0.5 level set is the mask's edge
  params = _strong("all")
  key = jax.random.key(3)
  pair = augment.augment_batch(key, image, mask, params)
  out_image, out_mask, out_soft = augment.augment_batch(key, image, mask, params, soft=soft)
  np.testing.assert_array_equal(np.asarray(out_image), np.asarray(pair[0]))
  np.testing.assert_array_equal(np.asarray(out_mask), np.asarray(pair[1]))
  out_soft = np.asarray(out_soft)
  assert out_soft.shape == soft.shape and 0.0 <= out_soft.min() and out_soft.max() <= 1.0
  assert 0.0 < np.mean((out_soft > 0) & (out_soft < 1))  # interpolated, not nearest
  assert _iou(out_soft > THRESHOLD, np.asarray(out_mask) > 0) > 0.95


# ----- robustness to other sites and diseased lungs -----


def _only(**strengths) -> augment.AugParams:
  off = {k: False if isinstance(v, bool) else 0.0 for k, v in default.get_config().aug.items()}
  return augment.AugParams(**{**off, "enabled": True, "elastic_sigma": 8.0, **strengths})


def _chest() -> tuple[np.ndarray, np.ndarray]:
  """A bright body with two dark lungs (and their mask) on a dark background."""
  yy, xx = np.mgrid[:SIZE, :SIZE]
  body = ((yy - 32) / 28) ** 2 + ((xx - 32) / 26) ** 2 < 1
  lungs = (((yy - 30) / 18) ** 2 + ((xx - 20) / 8) ** 2 < 1) | (
    ((yy - 30) / 18) ** 2 + ((xx - 44) / 8) ** 2 < 1
  )
  image = np.where(lungs, -1.0, np.where(body, 1.0, -2.0)).astype(np.float32)
  image = np.broadcast_to(image, (BATCH, SIZE, SIZE))[..., None].copy()
  mask = np.broadcast_to(lungs, (BATCH, SIZE, SIZE))[..., None].astype(np.float32)
  return image, mask


def test_a_painted_opacity_brightens_the_lungs_only_and_keeps_them_lung():
  image, mask = _chest()
  params = _only(opacity=1.0)
  out_image, out_mask = jax.jit(lambda k: augment.augment_batch(k, image, mask, params))(
    jax.random.key(0)
  )
  out_image, change = np.asarray(out_image), np.asarray(out_image) - image
  np.testing.assert_array_equal(np.asarray(out_mask), mask)  # still lung in the label
  lungs = mask[..., 0] > 0
  assert np.all(change[..., 0][~lungs] == 0)  # nothing outside the lungs
  assert np.all(change >= -1e-6)  # brighter, never darker
  assert np.all(out_image <= 1.0 + 1e-5)  # at most as bright as the body's tissue
  per_image = [change[b, ..., 0][lungs[b]].max() for b in range(BATCH)]
  assert min(per_image) > 0.5  # every image got an opacity (probability 1)
  # Weighted to the bases: the lower half of the lungs brightens more than the upper half.
  rows = np.arange(SIZE)[:, None] >= 30
  assert change[..., 0][lungs & rows].mean() > change[..., 0][lungs & ~rows].mean()


def test_a_contrast_window_keeps_the_range_and_the_order_of_intensities():
  rng = np.random.default_rng(0)
  image = rng.normal(size=(BATCH, SIZE, SIZE, 1)).astype(np.float32)
  mask = np.zeros_like(image)
  out, _ = augment.augment_batch(jax.random.key(1), image, mask, _only(window=0.3))
  out = np.asarray(out)
  for b in range(BATCH):
    x, y = image[b].ravel(), out[b].ravel()
    assert y.min() == pytest.approx(x.min(), abs=1e-4) and y.max() == pytest.approx(
      x.max(), abs=1e-4
    )
    order = np.argsort(x)
    assert np.all(np.diff(y[order]) >= -1e-5)  # monotone: a display curve, not a shuffle
    assert (y == y.min()).mean() > (x == x.min()).mean()  # the window clipped the darkest


def test_ap_magnification_widens_the_lungs_and_their_mask_together():
  image, mask = _chest()
  out_image, out_mask = augment.augment_batch(
    jax.random.key(2), image, mask, _only(magnification=0.3)
  )
  before, after = mask[0, ..., 0] > 0, np.asarray(out_mask)[0, ..., 0] > 0
  width = lambda m: np.ptp(np.flatnonzero(m.any(axis=0)))  # noqa: E731
  height = lambda m: np.ptp(np.flatnonzero(m.any(axis=1)))  # noqa: E731
  assert width(after) > width(before) and height(after) == height(before)
  assert _iou(np.abs(np.asarray(out_image)[0, ..., 0] + 1) < 0.5, after) > 0.9  # aligned


def test_local_contrast_sharpens_edges_and_keeps_flat_regions():
  image, mask = _chest()
  out, _ = augment.augment_batch(jax.random.key(3), image, mask, _only(local_contrast=1.0))
  out = np.asarray(out)
  assert np.ptp(out) > np.ptp(image)  # overshoot at the lung edges
  assert abs(out.mean() - image.mean()) < 0.05 * np.ptp(image)
