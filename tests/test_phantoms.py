"""Synthetic chest X-ray phantoms: deterministic, varied, with masks and visible lesions."""

import numpy as np
import pytest

from cxr_jax.data import phantoms

N = 40


@pytest.fixture(scope="module")
def examples() -> list[phantoms.Phantom]:
  return [phantoms.make_phantom(0, i) for i in range(N)]


def test_deterministic_per_seed_and_index(examples):
  again = phantoms.make_phantom(0, 3)
  np.testing.assert_array_equal(again.image, examples[3].image)
  np.testing.assert_array_equal(again.lungs, examples[3].lungs)
  other = phantoms.make_phantom(1, 3)
  assert other.image.shape != again.image.shape or not np.array_equal(other.image, again.image)


def test_shapes_sizes_and_types(examples):
  shapes = {p.image.shape for p in examples}
  assert len(shapes) > N // 2  # varied resolution
  assert any(h != w for h, w in shapes)  # some non-square
  for p in examples:
    h, w = p.image.shape
    assert (
      phantoms.MIN_SIDE <= h <= phantoms.MAX_SIDE and phantoms.MIN_SIDE <= w <= phantoms.MAX_SIDE
    )
    assert p.image.dtype == np.uint8 and p.lungs.dtype == np.uint8
    assert p.lungs.shape == p.image.shape and set(np.unique(p.lungs)) <= {0, 1}
  assert np.std([p.image.mean() for p in examples]) > 3  # varied brightness / contrast


def test_masks_and_labels_mixed(examples):
  has_mask = [p.has_mask for p in examples]
  labels = [p.label for p in examples]
  assert 0 < has_mask.count(False) < N // 3
  assert N // 4 < sum(labels) < 3 * N // 4


def test_lungs_are_two_dark_fields(examples):
  for p in examples:
    fraction = p.lungs.mean()
    assert 0.1 < fraction < 0.45
    h, w = p.lungs.shape
    assert p.lungs[:, : w // 2].any() and p.lungs[:, w // 2 :].any()  # both sides
    assert not p.lungs[:, w // 2 - 1 : w // 2 + 1].any()  # mediastinum between them
    # Air is dark: the lungs are darker than the soft tissue right around them.
    body = p.image > np.percentile(p.image, 30)
    tissue = body & (p.lungs == 0)
    assert p.image[p.lungs == 1].mean() < p.image[tissue].mean() - 10


def test_abnormal_opacities_inside_the_lungs(examples):
  for p in examples:
    if not p.label:
      assert not p.opacity.any()
      continue
    assert p.opacity.max() > 0.05
    assert not p.opacity[p.lungs == 0].any()
    # The lesion is visible: brighter than the rest of the same lungs.
    lesion = p.opacity > 0.5 * p.opacity.max()
    rest = (p.lungs == 1) & (p.opacity < 0.05 * p.opacity.max())
    assert p.image[lesion].mean() > p.image[rest].mean() + 5
