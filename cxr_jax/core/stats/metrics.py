"""Validation metrics as `clu.metrics` collections, built inside the jitted eval step.

Built with `single_from_model_output`, not `gather_from_model_output`: under `jax.jit` over a
mesh the arrays are global, so a plain `jnp.sum` already sums every device and host, and
there is no named axis for `all_gather`. What the step returns must go through `gather` on
every process, in the same order, before `.merge` / `.compute` (per-example AUC inputs are
sharded over hosts).

Conventions:
- Segmentation scores are per image, on `logit > 0`, averaged over the images with
  `has_mask * weight > 0`. 0/0 in a score: 1.0 when prediction and truth are both empty,
  0.0 otherwise (as `surface.py` at native resolution).
- Classification: accuracy from the argmax; sensitivity and specificity at
  `p_abnormal >= 0.5`; ROC AUC from all scores (ties count one half).
- `loss`: the weighted mean over all examples seen (scalar batch loss or per example [B]).
- A metric with nothing to average over (no masked image; AUC with one class) is NaN.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics
from jax.experimental import multihost_utils

from cxr_jax.core.stats.classification_stats import roc_auc


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
    def from_model_output(
      cls,
      mask_logits: jax.Array,
      lung_mask: jax.Array,
      has_mask: jax.Array,
      weight: jax.Array,
      **_,
    ) -> WeightedAverage:
      scores = segmentation_scores(mask_logits, lung_mask)
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
  def from_model_output(
    cls, loss: jax.Array, has_mask: jax.Array, weight: jax.Array, **_
  ) -> WeightedAverage:
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
  def from_model_output(
    cls, class_logits: jax.Array, label: jax.Array, weight: jax.Array, **_
  ) -> WeightedAverage:
    correct = jnp.argmax(class_logits, axis=-1) == label
    return cls.from_values(correct, weight)


@flax.struct.dataclass
class Sensitivity(WeightedAverage):
  """Fraction of abnormal (label 1) examples with p_abnormal >= 0.5."""

  @classmethod
  def from_model_output(
    cls, class_logits: jax.Array, label: jax.Array, weight: jax.Array, **_
  ) -> WeightedAverage:
    return cls.from_values(p_abnormal(class_logits) >= 0.5, weight * (label == 1))


@flax.struct.dataclass
class Specificity(WeightedAverage):
  """Fraction of normal (label 0) examples with p_abnormal < 0.5."""

  @classmethod
  def from_model_output(
    cls, class_logits: jax.Array, label: jax.Array, weight: jax.Array, **_
  ) -> WeightedAverage:
    return cls.from_values(p_abnormal(class_logits) < 0.5, weight * (label == 0))


@flax.struct.dataclass
class AUC(clu_metrics.CollectingMetric.from_outputs(("p_abnormal", "label", "weight"))):
  """ROC AUC of p_abnormal over every example merged (collected on the host, see `gather`)."""

  @classmethod
  def from_model_output(
    cls, class_logits: jax.Array, label: jax.Array, weight: jax.Array, **_
  ) -> "AUC":
    return super().from_model_output(
      p_abnormal=p_abnormal(class_logits), label=label, weight=weight
    )

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
  """Keyword inputs: mask_logits [B,H,W,1], lung_mask [B,H,W,1], has_mask [B], weight [B], loss.

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
