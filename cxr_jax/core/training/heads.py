"""Output heads, one table: for each model output, its loss, metrics and probability.

Losses, the eval step, the best-metric check, inference and evaluation loop over `HEADS`;
a new head is a model that returns a new output key plus one entry here.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
from clu import metrics as clu_metrics

from cxr_jax.core.stats import metrics
from cxr_jax.core.training import anatomy
from cxr_jax.core.training import losses
from cxr_jax.core.training import multilabel

Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Head:
  """One output of a model.

  Attributes:
    output: the key the model returns its logits under.
    name: short name: the metrics collection's key, and the loss is reported as
      `<name>_loss`.
    task: the section of evaluation summaries this head fills.
    loss: (logits, batch, config) -> scalar, a weighted mean over the global batch.
    loss_weight: config -> the loss's weight when the model has several heads.
    metrics: the clu Collection built inside the eval step (keyword inputs: the batch, the
      head's output key and `loss`).
    probability_key: the key of `probability` in inference outputs.
    probability: logits -> probabilities ([B, H, W] lung, [B] abnormal).
  """

  output: str
  name: str
  task: str
  loss: Callable[[jax.Array, Batch, ml_collections.ConfigDict], jax.Array]
  loss_weight: Callable[[ml_collections.ConfigDict], float]
  metrics: type[clu_metrics.Collection]
  probability_key: str
  probability: Callable[[jax.Array], jax.Array]

  @property
  def loss_key(self) -> str:
    return f"{self.name}_loss"


HEADS = (
  Head(
    output="mask_logits",
    name="seg",
    task="segmentation",
    loss=lambda logits, batch, config: losses.segmentation_loss(
      logits,
      batch["lung_mask"],
      batch["has_mask"] * batch["weight"],
      dice_weight=config.loss.dice_weight,
    ),
    loss_weight=lambda config: 1.0,
    metrics=metrics.SegmentationMetrics,
    probability_key="prob",
    probability=lambda logits: jax.nn.sigmoid(logits[..., 0]),
  ),
  Head(
    output="class_logits",
    name="cls",
    task="classification",
    loss=lambda logits, batch, config: losses.classification_loss(
      logits, batch["label"], batch["weight"]
    ),
    loss_weight=lambda config: config.loss.class_weight,
    metrics=metrics.ClassificationMetrics,
    probability_key="p_abnormal",
    probability=metrics.p_abnormal,
  ),
  Head(
    output="structure_logits",
    name="struct",
    task="structures",
    loss=lambda logits, batch, config: anatomy.structure_loss(
      logits,
      batch["structures"],
      batch["has_structures"] * batch["weight"][:, None],
      dice_weight=config.loss.dice_weight,
    ),
    loss_weight=lambda config: config.loss.structure_weight,
    metrics=anatomy.StructureMetrics,
    probability_key="p_structures",
    probability=jax.nn.sigmoid,
  ),
  Head(
    output="finding_logits",
    name="findings",
    task="findings",
    loss=lambda logits, batch, config: multilabel.findings_loss(
      logits, batch["findings"], batch["findings_weight"] * batch["weight"][:, None]
    ),
    loss_weight=lambda config: config.loss.findings_weight,
    metrics=multilabel.FindingMetrics,
    probability_key="p_findings",
    probability=jax.nn.sigmoid,
  ),
)


def present(outputs: Mapping[str, Any]) -> list[Head]:
  """The heads whose output the model returns (`outputs` may be abstract)."""
  return [head for head in HEADS if head.output in outputs]


def compute_losses(
  outputs: Mapping[str, jax.Array], batch: Batch, config: ml_collections.ConfigDict
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss and each head's part (`<name>_loss`); one head has weight 1. With the
  deep-supervision outputs (`aux_mask_logits`, training only), the lungs' part is nnU-Net's
  normalised sum (L_0 + sum_k 2**-k L_k) / (1 + sum_k 2**-k), and `deep_supervision_loss`
  (sum_k 2**-k L_k) is reported beside `seg_loss` (L_0, as validation reports it)."""
  heads = present(outputs)
  parts, total = {}, 0.0
  for head in heads:
    loss = parts[head.loss_key] = head.loss(outputs[head.output], batch, config)
    if head.output == "mask_logits" and outputs.get("aux_mask_logits"):
      aux, aux_weights = losses.deep_supervision_loss(
        outputs["aux_mask_logits"],
        batch["lung_mask"],
        batch["has_mask"] * batch["weight"],
        config.loss.dice_weight,
      )
      parts["deep_supervision_loss"] = aux
      loss = (loss + aux) / (1.0 + aux_weights)
    weight = head.loss_weight(config) if len(heads) > 1 else 1.0
    total += weight * loss
  return total, parts


def metric_collections(
  outputs: Mapping[str, jax.Array], batch: Batch, parts: Mapping[str, jax.Array]
) -> dict[str, clu_metrics.Collection]:
  """Each head's metrics of one batch (inside jit), keyed by head name."""
  return {
    head.name: head.metrics.single_from_model_output(
      **batch, **{head.output: outputs[head.output]}, loss=parts[head.loss_key]
    )
    for head in present(outputs)
  }


def metric_name(head_name: str, key: str) -> str:
  """Validation metric names: each head's loss is `<name>_loss`, as in training."""
  return f"{head_name}_loss" if key == "loss" else key


def validation_metric_names(outputs: Mapping[str, Any]) -> set[str]:
  """Every validation metric a model with these outputs reports."""
  return {
    metric_name(head.name, key) for head in present(outputs) for key in head.metrics.__annotations__
  }


def probabilities(outputs: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """{probability_key: probabilities} of every head present."""
  return {head.probability_key: head.probability(outputs[head.output]) for head in present(outputs)}
