"""Metrics on fixed predictions: exact expected numbers, empty and one-pixel masks, padding."""

import itertools
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_jax.core.stats import classification_stats
from cxr_jax.core.stats import metrics

BIG = 10.0  # a logit far from the threshold


def _logits(pred: np.ndarray) -> np.ndarray:
  return np.where(pred > 0, BIG, -BIG).astype(np.float32)


def _masks():
  """Four 4x4 images: [pred, true] pairs with hand-countable overlaps."""
  pred = np.zeros((4, 4, 4, 1), np.float32)
  true = np.zeros((4, 4, 4, 1), np.float32)
  # 0: pred 4 px, true 6 px, overlap 3 -> dice 6/10, iou 3/7, precision 3/4, recall 3/6.
  pred[0, 0, :4] = 1
  pred[0, 0, 3] = 0
  pred[0, 1, 0] = 1
  true[0, 0, :3] = 1
  true[0, 2, :3] = 1
  # 1: both empty -> all 1.
  # 2: one-pixel truth, predicted exactly -> all 1.
  pred[2, 3, 3] = 1
  true[2, 3, 3] = 1
  # 3: one-pixel truth, empty prediction -> dice 0, iou 0, precision 0 (0/0), recall 0.
  true[3, 1, 1] = 1
  return pred, true


def test_binary_scores_hand_computed():
  pred, true = _masks()
  assert pred[0].sum() == 4 and true[0].sum() == 6 and (pred[0] * true[0]).sum() == 3
  expected = {
    "dice": [6 / 10, 1, 1, 0],
    "iou": [3 / 7, 1, 1, 0],
    "precision": [3 / 4, 1, 1, 0],
    "recall": [3 / 6, 1, 1, 0],
  }
  for impl in (
    lambda p, t: metrics.binary_scores(p > 0, t > 0),
    lambda p, t: metrics.segmentation_scores(jnp.asarray(_logits(p)), jnp.asarray(t)),
  ):
    scores = impl(pred, true)
    for key, values in expected.items():
      np.testing.assert_allclose(np.asarray(scores[key]), values, rtol=1e-6, err_msg=key)


def test_binary_scores_empty_truth_nonempty_prediction():
  pred = np.zeros((1, 3, 3), bool)
  pred[0, 1, 1] = True
  scores = metrics.binary_scores(pred, np.zeros_like(pred))
  assert isinstance(scores["dice"], np.ndarray)  # numpy in, numpy out
  assert {k: float(v[0]) for k, v in scores.items()} == {
    "dice": 0.0,
    "iou": 0.0,
    "precision": 0.0,
    "recall": 0.0,
  }


def test_segmentation_metrics_average_over_masked_real_images_across_batches():
  pred, true = _masks()
  logits = _logits(pred)
  # Batch 1: images 0, 1 and an unmasked image (garbage prediction) -> only 0, 1 count.
  # Batch 2: images 2, 3 and a padding example (weight 0, has_mask 1) -> only 2, 3 count.
  garbage = np.full((1, 4, 4, 1), BIG, np.float32)
  b1 = dict(
    mask_logits=np.concatenate([logits[:2], garbage]),
    lung_mask=np.concatenate([true[:2], np.zeros((1, 4, 4, 1), np.float32)]),
    has_mask=np.array([1, 1, 0], np.float32),
    weight=np.ones(3, np.float32),
    loss=np.float32(0.5),
  )
  b2 = dict(
    mask_logits=np.concatenate([logits[2:], garbage]),
    lung_mask=np.concatenate([true[2:], np.ones((1, 4, 4, 1), np.float32)]),
    has_mask=np.ones(3, np.float32),
    weight=np.array([1, 1, 0], np.float32),
    loss=np.array([1.0, 2.0, 100.0], np.float32),
  )  # per-example losses work too

  @jax.jit
  def eval_step(batch):
    return metrics.SegmentationMetrics.single_from_model_output(**batch)

  merged = metrics.SegmentationMetrics.empty()
  for batch in (b1, b2):
    merged = merged.merge(metrics.gather(eval_step(batch)))
  result = merged.compute()
  assert set(result) == {"dice", "iou", "precision", "recall", "loss"}
  assert all(type(v) is float for v in result.values())
  np.testing.assert_allclose(result["dice"], (0.6 + 1 + 1 + 0) / 4, rtol=1e-6)
  np.testing.assert_allclose(result["iou"], (3 / 7 + 2) / 4, rtol=1e-6)
  np.testing.assert_allclose(result["precision"], (0.75 + 2) / 4, rtol=1e-6)
  np.testing.assert_allclose(result["recall"], (0.5 + 2) / 4, rtol=1e-6)
  # Batch 1's scalar loss stands for its 2 masked images; batch 2 gives 1.0 and 2.0.
  np.testing.assert_allclose(result["loss"], (0.5 * 2 + 1.0 + 2.0) / 4, rtol=1e-6)


def test_segmentation_metrics_without_any_mask_are_nan():
  batch = dict(
    mask_logits=np.zeros((2, 2, 2, 1), np.float32),
    lung_mask=np.zeros((2, 2, 2, 1), np.float32),
    has_mask=np.zeros(2, np.float32),
    weight=np.ones(2, np.float32),
    loss=np.float32(0),
  )
  result = metrics.SegmentationMetrics.single_from_model_output(**batch).compute()
  assert all(math.isnan(v) for v in result.values())


def _brute_force_auc(scores, labels):
  pairs = [
    (p, n)
    for p, n in itertools.product(range(len(scores)), repeat=2)
    if labels[p] == 1 and labels[n] == 0
  ]
  wins = sum(
    1.0 if scores[p] > scores[n] else 0.5 if scores[p] == scores[n] else 0.0 for p, n in pairs
  )
  return wins / len(pairs)


def test_roc_auc_against_pairwise_count_with_ties():
  rng = np.random.default_rng(0)
  for _ in range(20):
    n = int(rng.integers(2, 30))
    scores = rng.integers(0, 5, n) / 4.0  # few distinct values: many ties
    labels = rng.integers(0, 2, n)
    if labels.min() == labels.max():
      labels[0] = 1 - labels[0]
    np.testing.assert_allclose(
      classification_stats.roc_auc(scores, labels), _brute_force_auc(scores, labels), rtol=1e-12
    )
  assert classification_stats.roc_auc([0.1, 0.9], [0, 1]) == 1.0
  assert classification_stats.roc_auc([0.5, 0.5], [0, 1]) == 0.5
  assert math.isnan(classification_stats.roc_auc([0.1, 0.9], [1, 1]))
  # Weight 0 drops an example; weight 2 counts it twice.
  np.testing.assert_allclose(
    classification_stats.roc_auc([0.1, 0.9, 0.3], [0, 1, 1], [1, 1, 0]), 1.0
  )
  np.testing.assert_allclose(
    classification_stats.roc_auc([0.2, 0.4, 0.3], [0, 1, 0], [1, 1, 2]),
    _brute_force_auc([0.2, 0.4, 0.3, 0.3], [0, 1, 0, 0]),
  )


def _class_logits(p: np.ndarray) -> np.ndarray:
  """Logits whose softmax[:, 1] is exactly-ish p."""
  return np.stack([np.zeros_like(p), np.log(p / (1 - p))], axis=1).astype(np.float32)


def test_classification_metrics_hand_computed_with_padding():
  #                     abnormal: 0.9 right, 0.4 wrong, 0.7 right; normal: 0.2 right, 0.6 wrong
  p1 = np.array([0.9, 0.4, 0.2, 0.6], np.float32)
  label1 = np.array([1, 1, 0, 0], np.int32)
  p2 = np.array([0.7, 0.99, 0.01], np.float32)  # the last two are padding
  label2 = np.array([1, 0, 1], np.int32)
  batches = [
    dict(
      class_logits=_class_logits(p1),
      label=label1,
      weight=np.ones(4, np.float32),
      loss=np.float32(0.25),
    ),
    dict(
      class_logits=_class_logits(p2),
      label=label2,
      weight=np.array([1, 0, 0], np.float32),
      loss=np.float32(1.0),
    ),
  ]
  eval_step = jax.jit(lambda b: metrics.ClassificationMetrics.single_from_model_output(**b))
  merged = None
  for batch in batches:
    m = metrics.gather(eval_step(batch))
    merged = m if merged is None else merged.merge(m)
  result = merged.compute()
  assert set(result) == {"accuracy", "auc", "sensitivity", "specificity", "loss"}
  np.testing.assert_allclose(result["accuracy"], 3 / 5, rtol=1e-6)
  np.testing.assert_allclose(result["sensitivity"], 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(result["specificity"], 1 / 2, rtol=1e-6)
  np.testing.assert_allclose(result["loss"], (0.25 * 4 + 1.0 * 1) / 5, rtol=1e-6)
  # Positives 0.9, 0.4, 0.7 vs negatives 0.2, 0.6: 5 of 6 pairs ranked right.
  np.testing.assert_allclose(result["auc"], 5 / 6, rtol=1e-6)


def test_gather_copies_to_numpy():
  m = metrics.ClassificationMetrics.single_from_model_output(
    class_logits=jnp.zeros((2, 2)), label=jnp.array([0, 1]), weight=jnp.ones(2), loss=0.0
  )
  host = metrics.gather(m)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host))
  assert host.auc.compute() == 0.5


def test_shape_errors():
  with pytest.raises(ValueError, match="masks"):
    metrics.binary_scores(np.zeros((2, 3)), np.zeros((2, 4)))
  with pytest.raises(ValueError, match="C >= 2"):
    metrics.p_abnormal(jnp.zeros((3, 1)))


_SHARDED_SCRIPT = """
import jax, numpy as np
from cxr_jax.core.run import sharding
from cxr_jax.core.stats import metrics
assert jax.device_count() == 4
mesh = sharding.create_mesh()
rng = np.random.default_rng(0)
batch = dict(mask_logits=rng.normal(size=(8, 6, 6, 1)).astype(np.float32),
             lung_mask=(rng.random((8, 6, 6, 1)) > 0.5).astype(np.float32),
             has_mask=np.array([1, 1, 1, 0, 0, 0, 1, 1], np.float32),
             weight=np.array([1, 1, 1, 1, 1, 1, 0, 1], np.float32),
             class_logits=rng.normal(size=(8, 2)).astype(np.float32),
             label=np.array([0, 1, 1, 0, 1, 0, 0, 1], np.int32), loss=np.float32(0.3))

def step(b):
  return (metrics.SegmentationMetrics.single_from_model_output(**b),
          metrics.ClassificationMetrics.single_from_model_output(**b))

want = [m.compute() for m in metrics.gather(jax.jit(step)(batch))]
loss = batch.pop("loss")
global_batch = sharding.to_global(batch, mesh)
assert len(global_batch["lung_mask"].sharding.device_set) == 4
got = [m.compute() for m in metrics.gather(jax.jit(step)(dict(global_batch, loss=loss)))]
for w, g in zip(want, got):
  assert w.keys() == g.keys()
  for k in w:
    np.testing.assert_allclose(g[k], w[k], rtol=1e-6, err_msg=k)
print("OK", got)
"""


def test_sharded_batch_matches_unsharded():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-c", _SHARDED_SCRIPT],
    cwd=pathlib.Path(__file__).resolve().parents[1],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert "OK" in result.stdout
