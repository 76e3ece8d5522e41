"""Losses: exact masking, hand-computed values, global normalisation over a sharded batch."""

import math
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_jax.core.training import losses

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _batch(seed: int = 0, b: int = 4, s: int = 6):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0.0, 3.0, (b, s, s, 1)).astype(np.float32)
  mask = (rng.random((b, s, s, 1)) > 0.5).astype(np.float32)
  return jnp.asarray(logits), jnp.asarray(mask)


def _sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def test_segmentation_loss_hand_computed():
  # Image 0: two pixels, logits (0, 2), mask (1, 0). Image 1: unmasked, ignored.
  logits = jnp.array([[0.0, 2.0], [5.0, -5.0]]).reshape(2, 1, 2, 1)
  mask = jnp.array([[1.0, 0.0], [0.0, 0.0]]).reshape(2, 1, 2, 1)
  weight = jnp.array([1.0, 0.0])
  bce = (math.log(2.0) + (2.0 + math.log1p(math.exp(-2.0)))) / 2
  p0, p1 = 0.5, _sigmoid(2.0)
  dice = (2 * p0 * 1 + 1.0) / (p0 + p1 + 1 + 1.0)
  for dice_weight in (0.0, 1.0, 0.5):
    got = losses.segmentation_loss(logits, mask, weight, dice_weight)
    np.testing.assert_allclose(got, bce + dice_weight * (1 - dice), rtol=1e-6)


def test_segmentation_loss_is_mean_over_masked_images():
  logits, mask = _batch()
  parts = losses.segmentation_loss_per_image(logits, mask)
  per_image = np.asarray(parts["bce"] + 1.0 - parts["dice"])
  weight = jnp.array([1.0, 0.0, 1.0, 1.0])
  np.testing.assert_allclose(
    losses.segmentation_loss(logits, mask, weight), per_image[[0, 2, 3]].mean(), rtol=1e-6
  )


def test_bce_stable_for_huge_logits():
  logits = jnp.array([1e4, -1e4, 1e4, -1e4]).reshape(1, 2, 2, 1)
  mask = jnp.array([1.0, 0.0, 0.0, 1.0]).reshape(1, 2, 2, 1)
  bce = losses.segmentation_loss_per_image(logits, mask)["bce"]
  np.testing.assert_allclose(bce, [(1e4 + 1e4) / 4], rtol=1e-6)
  grad = jax.jit(jax.grad(lambda x: losses.segmentation_loss(x, mask, jnp.ones(1))))(logits)
  assert np.all(np.isfinite(grad))


def test_unmasked_examples_ignored_bitwise():
  logits, mask = _batch()
  weight = jnp.array([1.0, 0.0, 1.0, 0.0])
  other_logits, other_mask = _batch(seed=1)
  unmasked = (weight == 0)[:, None, None, None]
  # Garbage (even inf/nan) in the unmasked images changes nothing.
  changed_logits = jnp.where(unmasked, other_logits * 1e3, logits).at[1, 0, 0, 0].set(jnp.nan)
  changed_mask = jnp.where(unmasked, other_mask, mask)

  @jax.jit
  def value_and_grad(x, m):
    return jax.value_and_grad(lambda x: losses.segmentation_loss(x, m, weight, 1.0))(x)

  loss_a, grad_a = value_and_grad(logits, mask)
  loss_b, grad_b = value_and_grad(changed_logits, changed_mask)
  assert np.asarray(loss_a).tobytes() == np.asarray(loss_b).tobytes()
  masked = np.asarray(weight) > 0
  assert np.asarray(grad_a)[masked].tobytes() == np.asarray(grad_b)[masked].tobytes()
  assert np.all(np.asarray(grad_a)[~masked] == 0)
  assert np.all(np.asarray(grad_b)[~masked] == 0)


def test_all_zero_weight_gives_zero_loss_and_gradient():
  logits, mask = _batch()
  weight = jnp.zeros(4)
  loss, grad = jax.jit(jax.value_and_grad(lambda x: losses.segmentation_loss(x, mask, weight)))(
    logits
  )
  assert float(loss) == 0.0
  assert np.all(np.asarray(grad) == 0.0)
  class_logits = jnp.ones((4, 2))
  loss, grad = jax.jit(
    jax.value_and_grad(lambda x: losses.classification_loss(x, jnp.array([0, 1, 1, 0]), weight))
  )(class_logits)
  assert float(loss) == 0.0
  assert np.all(np.asarray(grad) == 0.0)


def test_classification_loss_hand_computed_and_masked():
  class_logits = jnp.array([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0], [100.0, -100.0]])
  label = jnp.array([0, 1, 1, 1])
  weight = jnp.array([1.0, 1.0, 1.0, 0.0])
  expected = (
    math.log(2.0) + (math.log(math.exp(2.0) + 1.0) - 0.0) + (math.log(1.0 + math.exp(3.0)) - 3.0)
  ) / 3
  np.testing.assert_allclose(
    losses.classification_loss(class_logits, label, weight), expected, rtol=1e-6
  )
  changed = class_logits.at[3].set(jnp.array([jnp.nan, 123.0]))
  grad_fn = jax.jit(jax.value_and_grad(lambda x: losses.classification_loss(x, label, weight)))
  (la, ga), (lb, gb) = grad_fn(class_logits), grad_fn(changed)
  assert np.asarray(la).tobytes() == np.asarray(lb).tobytes()
  assert np.asarray(ga).tobytes() == np.asarray(gb).tobytes()


def test_shape_errors_say_what_is_wrong():
  with pytest.raises(ValueError, match=r"\[B, H, W, 1\]"):
    losses.segmentation_loss(jnp.zeros((2, 4, 4)), jnp.zeros((2, 4, 4)), jnp.ones(2))
  with pytest.raises(ValueError, match=r"\[B, C\]"):
    losses.classification_loss(jnp.zeros(3), jnp.zeros(3, jnp.int32), jnp.ones(3))
  with pytest.raises(ValueError, match="same"):
    losses.weighted_mean(jnp.zeros(3), jnp.ones(2))


_SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from cxr_jax.core.run import sharding
    from cxr_jax.core.training import losses
    assert jax.device_count() == 4, jax.devices()
    mesh = sharding.create_mesh()
    rng = np.random.default_rng(0)
    b, s = 8, 8
    logits = rng.normal(0, 2, (b, s, s, 1)).astype(np.float32)
    mask = (rng.random((b, s, s, 1)) > 0.5).astype(np.float32)
    # Devices hold 2 examples each; counted masks (has_mask * weight): 2, 1, 0 and 1 (uneven).
    has_mask = np.array([1, 1, 1, 0, 0, 0, 1, 1], np.float32)
    weight = np.array([1, 1, 1, 1, 1, 1, 0, 1], np.float32)
    class_logits = rng.normal(0, 2, (b, 2)).astype(np.float32)
    label = np.array([0, 1, 1, 0, 1, 0, 0, 1], np.int32)
    counted = has_mask * weight > 0

    def loss_fn(logits, mask, has_mask, class_logits, label, weight):
      return (losses.segmentation_loss(logits, mask, has_mask * weight, 1.0),
              losses.classification_loss(class_logits, label, weight))

    args = (logits, mask, has_mask, class_logits, label, weight)
    unsharded = jax.jit(loss_fn)(*args)
    global_args = sharding.to_global(dict(enumerate(args)), mesh)
    assert len(global_args[0].sharding.device_set) == 4
    sharded = jax.jit(loss_fn)(*[global_args[i] for i in range(len(args))])
    expected_seg = losses.segmentation_loss(logits[counted], mask[counted], np.ones(4))
    for a, c in zip(unsharded, sharded):
      np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sharded[0]), np.asarray(expected_seg), rtol=1e-6)
    print("OK", [float(x) for x in sharded])
""")


def test_sharded_batch_matches_unsharded():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-c", _SHARDED_SCRIPT],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert "OK" in result.stdout
