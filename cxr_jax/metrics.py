"""Evaluation metrics as `clu.metrics` collections, built inside the jitted eval step.

How they are used (one way, the one `train.py` uses):

    # inside jax.jit, on global arrays sharded over the mesh's `data` axis:
    seg = SegmentationMetrics.single_from_model_output(
        mask_logits=outputs["mask_logits"], mask=batch["mask"], has_mask=batch["has_mask"],
        weight=batch["weight"], loss=seg_loss)
    # on the host, per batch, then once at the end:
    seg = gather(seg)  # every batch, the first too, before anything reads it
    total = seg if total is None else total.merge(seg)
    total.compute()  # {'dice': float, 'iou': ..., 'precision': ..., 'recall': ..., 'loss': ...}

Why `single_from_model_output` and not `gather_from_model_output`: under `jax.jit` over a
mesh the arrays are global, so a plain `jnp.sum` over the batch already sums every device and
every host. `gather_from_model_output` calls `jax.lax.all_gather(axis_name=...)`, which needs a
named axis (`pmap`, `shard_map`); there is none under jit, and no pmap in this codebase.

Multi-process: what the jitted step returns are global arrays. The sums (scalars) are
replicated, but the per-example scores collected for the AUC are sharded over hosts and no
process can read them alone. `gather` (`process_allgather` where needed, a no-op copy to numpy
otherwise) must run on every process, in the same order, before `.merge` / `.compute`.

Conventions:
- Segmentation scores are per image, on the thresholded prediction `logit > 0`, then averaged
  over the images with `has_mask * weight > 0` (weighted by it; weights are 0 or 1 in
  practice). An image without a mask, or a padding example, counts for nothing.
- 0/0 in a per-image score: 1.0 when prediction and truth are both empty (nothing to find,
  nothing found), 0.0 otherwise. So precision of an empty prediction of a non-empty mask is 0,
  recall of a non-empty prediction on an empty mask is 0. Same as `surface.py`, which computes
  these at native resolution for `evaluate.py`.
- Classification: `p_abnormal = softmax(class_logits)[:, 1]`; accuracy from the argmax,
  sensitivity (recall of abnormal) and specificity (recall of normal) at `p_abnormal >= 0.5`;
  ROC AUC from all scores, ties counted as one half (the Mann-Whitney statistic with average
  ranks). Padding (weight 0) counts for nothing.
- `loss`: the weighted mean over all examples seen. `loss` may be the batch's scalar loss
  (a weighted mean itself: it is re-weighted by the batch's total weight) or per-example [B].
- A metric with nothing to average over (no masked image; AUC without both classes) is NaN.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics
from jax.experimental import multihost_utils

SEGMENTATION_KEYS = ("dice", "iou", "precision", "recall")


# ----------------------------------------------------------------------------------------
# Per-image scores (jit-able; also accept numpy arrays).
# ----------------------------------------------------------------------------------------
def binary_scores(pred: Any, true: Any) -> dict[str, Any]:
  """Dice, IoU, precision and recall of binary masks, one value per image.

  Args:
    pred: [B, ...] bool (or {0, 1}) predicted masks.
    true: [B, ...] bool (or {0, 1}) true masks, same shape.

  Returns:
    dict with 'dice', 'iou', 'precision', 'recall': [B] float32 (numpy in, numpy out).
  """
  xp = np if isinstance(pred, np.ndarray) and isinstance(true, np.ndarray) else jnp
  if pred.shape != true.shape or pred.ndim < 2:
    raise ValueError(f"pred {pred.shape} and true {true.shape} must both be [B, ...] masks.")
  pred, true = pred.astype(bool), true.astype(bool)
  axes = tuple(range(1, pred.ndim))
  tp = xp.sum(pred & true, axis=axes).astype(xp.float32)
  n_pred = xp.sum(pred, axis=axes).astype(xp.float32)
  n_true = xp.sum(true, axis=axes).astype(xp.float32)
  both_empty = (n_pred == 0) & (n_true == 0)

  def ratio(num, den):
    # 0/0: 1 when both masks are empty, 0 otherwise (see the module docstring).
    safe = xp.where(den > 0, den, 1.0)
    return xp.where(den > 0, num / safe, xp.where(both_empty, 1.0, 0.0)).astype(xp.float32)

  return {
      "dice": ratio(2.0 * tp, n_pred + n_true),
      "iou": ratio(tp, n_pred + n_true - tp),
      "precision": ratio(tp, n_pred),
      "recall": ratio(tp, n_true),
  }


def segmentation_scores(mask_logits: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """`binary_scores` of the prediction `mask_logits > 0` against `mask` (> 0.5): [B] each."""
  return binary_scores(mask_logits > 0, mask > 0.5)


# ----------------------------------------------------------------------------------------
# Metrics.
# ----------------------------------------------------------------------------------------
def _weighted_sums(values: jax.Array, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
  counts = weight > 0
  total = jnp.sum(jnp.where(counts, weight * values, 0.0)).astype(jnp.float32)
  return total, jnp.sum(jnp.where(counts, weight, 0.0)).astype(jnp.float32)


@flax.struct.dataclass
class WeightedAverage(clu_metrics.Metric):
  """sum(w * value) / sum(w) over every example merged; entries with w <= 0 are ignored."""

  total: jax.Array
  weight: jax.Array

  @classmethod
  def empty(cls) -> "WeightedAverage":
    return cls(total=jnp.zeros((), jnp.float32), weight=jnp.zeros((), jnp.float32))

  @classmethod
  def from_values(cls, values: jax.Array, weight: jax.Array) -> "WeightedAverage":
    """values [B] (or a scalar: a batch mean, counted `sum(weight)` times), weight [B]."""
    values = jnp.asarray(values, jnp.float32)
    weight = jnp.asarray(weight, jnp.float32)
    if values.ndim == 0:
      values = jnp.broadcast_to(values, weight.shape)
    return cls(*_weighted_sums(values, weight))

  def merge(self, other: "WeightedAverage") -> "WeightedAverage":
    return type(self)(total=self.total + other.total, weight=self.weight + other.weight)

  def compute(self) -> float:
    weight = float(self.weight)
    return float(self.total) / weight if weight > 0 else float("nan")


def _segmentation_score(key: str) -> type[WeightedAverage]:
  """A WeightedAverage of one per-image segmentation score over images with a mask."""

  @flax.struct.dataclass
  class Score(WeightedAverage):

    @classmethod
    def from_model_output(cls, mask_logits: jax.Array, mask: jax.Array, has_mask: jax.Array,
                          weight: jax.Array, **_) -> WeightedAverage:
      scores = segmentation_scores(mask_logits, mask)
      return cls.from_values(scores[key], has_mask * weight)

  Score.__name__ = Score.__qualname__ = f"{key.capitalize()}Score"
  return Score


Dice = _segmentation_score("dice")
IoU = _segmentation_score("iou")
Precision = _segmentation_score("precision")
Recall = _segmentation_score("recall")


@flax.struct.dataclass
class SegmentationLoss(WeightedAverage):
  """The segmentation loss averaged over images with a mask (scalar batch loss or [B])."""

  @classmethod
  def from_model_output(cls, loss: jax.Array, has_mask: jax.Array, weight: jax.Array,
                        **_) -> WeightedAverage:
    return cls.from_values(loss, has_mask * weight)


@flax.struct.dataclass
class ClassificationLoss(WeightedAverage):
  """The classification loss averaged over real examples (scalar batch loss or [B])."""

  @classmethod
  def from_model_output(cls, loss: jax.Array, weight: jax.Array, **_) -> WeightedAverage:
    return cls.from_values(loss, weight)


def p_abnormal(class_logits: jax.Array) -> jax.Array:
  """[B, C] logits -> [B] probability of class 1 (abnormal)."""
  if class_logits.ndim != 2 or class_logits.shape[1] < 2:
    raise ValueError(f"class_logits {class_logits.shape} must be [B, C] with C >= 2.")
  return jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[:, 1]


@flax.struct.dataclass
class Accuracy(WeightedAverage):
  """Fraction of real examples whose argmax class is the label."""

  @classmethod
  def from_model_output(cls, class_logits: jax.Array, label: jax.Array, weight: jax.Array,
                        **_) -> WeightedAverage:
    correct = jnp.argmax(class_logits, axis=-1) == label
    return cls.from_values(correct, weight)


@flax.struct.dataclass
class Sensitivity(WeightedAverage):
  """Fraction of abnormal (label 1) examples with p_abnormal >= 0.5."""

  @classmethod
  def from_model_output(cls, class_logits: jax.Array, label: jax.Array, weight: jax.Array,
                        **_) -> WeightedAverage:
    return cls.from_values(p_abnormal(class_logits) >= 0.5, weight * (label == 1))


@flax.struct.dataclass
class Specificity(WeightedAverage):
  """Fraction of normal (label 0) examples with p_abnormal < 0.5."""

  @classmethod
  def from_model_output(cls, class_logits: jax.Array, label: jax.Array, weight: jax.Array,
                        **_) -> WeightedAverage:
    return cls.from_values(p_abnormal(class_logits) < 0.5, weight * (label == 0))


def roc_auc(scores: np.ndarray, labels: np.ndarray, weight: np.ndarray | None = None) -> float:
  """Area under the ROC curve; ties between a positive and a negative count one half.

  Equal to the fraction of (positive, negative) pairs ranked correctly (Mann-Whitney U with
  average ranks), each pair weighted by the product of the two weights. O(n log n).

  Args:
    scores: [N] scores, higher means more likely positive.
    labels: [N] 1 positive, 0 negative.
    weight: [N] non-negative; examples with weight 0 are ignored. None: all 1.

  Returns:
    The AUC, or NaN when there is no positive or no negative example with weight > 0.
  """
  scores = np.asarray(scores, np.float64).ravel()
  labels = np.asarray(labels).ravel()
  weight = np.ones_like(scores) if weight is None else np.asarray(weight, np.float64).ravel()
  if not scores.shape == labels.shape == weight.shape:
    raise ValueError(f"scores {scores.shape}, labels {labels.shape} and weight {weight.shape} "
                     "must have the same length.")
  keep = weight > 0
  scores, weight = scores[keep], weight[keep]
  positive = labels[keep] == 1
  w_pos, w_neg = np.where(positive, weight, 0.0), np.where(positive, 0.0, weight)
  total_pos, total_neg = w_pos.sum(), w_neg.sum()
  if total_pos <= 0 or total_neg <= 0:
    return float("nan")
  unique, group = np.unique(scores, return_inverse=True)  # ascending; ties share a group
  pos_per_group = np.bincount(group, w_pos, len(unique))
  neg_per_group = np.bincount(group, w_neg, len(unique))
  neg_below = np.cumsum(neg_per_group) - neg_per_group
  wins = np.sum(pos_per_group * (neg_below + 0.5 * neg_per_group))
  return float(wins / (total_pos * total_neg))


@flax.struct.dataclass
class AUC(clu_metrics.CollectingMetric.from_outputs(("p_abnormal", "label", "weight"))):
  """ROC AUC of p_abnormal over every example merged (collected on the host, see `gather`)."""

  @classmethod
  def from_model_output(cls, class_logits: jax.Array, label: jax.Array, weight: jax.Array,
                        **_) -> "AUC":
    return super().from_model_output(
        p_abnormal=p_abnormal(class_logits), label=label, weight=weight)

  def compute(self) -> float:
    if not self.values:
      return float("nan")
    values = super().compute()
    return roc_auc(values["p_abnormal"], values["label"], values["weight"])


# ----------------------------------------------------------------------------------------
# Collections.
# ----------------------------------------------------------------------------------------
class _FloatCollection(clu_metrics.Collection):
  """`compute()` returns plain Python floats, ready for writers and JSON."""

  def compute(self) -> dict[str, float]:
    return {name: float(value) for name, value in super().compute().items()}


@flax.struct.dataclass
class SegmentationMetrics(_FloatCollection):
  """Keyword inputs: mask_logits [B,H,W,1], mask [B,H,W,1], has_mask [B], weight [B], loss.

  compute() -> {'dice', 'iou', 'precision', 'recall', 'loss'}: floats.
  """

  dice: Dice
  iou: IoU
  precision: Precision
  recall: Recall
  loss: SegmentationLoss


@flax.struct.dataclass
class ClassificationMetrics(_FloatCollection):
  """Keyword inputs: class_logits [B,C], label [B] int, weight [B], loss.

  compute() -> {'accuracy', 'auc', 'sensitivity', 'specificity', 'loss'}: floats.
  """

  accuracy: Accuracy
  auc: AUC
  sensitivity: Sensitivity
  specificity: Specificity
  loss: ClassificationLoss


def gather(tree: Any) -> Any:
  """Copies a pytree of metric states (or collections) returned by the jitted step to numpy.

  Arrays no single process can read (sharded over hosts) are gathered from every process with
  `multihost_utils.process_allgather`; that is a collective: call `gather` on every process,
  in the same order. Single-process, it is a plain device-to-host copy.
  """

  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(fetch, tree)

