"""Multi-label findings: a sigmoid per finding, its loss over labelled findings only, and the
validation metrics (macro ROC AUC over findings).

`finding_logits` [B, N] pairs with the batch's `findings` [B, N] targets and
`findings_weight` [B, N] (0 where a finding is missing, or uncertain under the 'ignore'
policy: see `cxr_jax.data.findings.targets`).
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from cxr_jax.core.stats import metrics
from cxr_jax.core.stats.classification_stats import roc_auc
from cxr_jax.core.training import losses


def findings_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """Binary cross-entropy per (image, finding), weighted mean over labelled pairs.

  Args:
    logits, targets: [B, N] float; weights: [B, N] (`findings_weight * weight`).
  """
  x = jnp.where(weights > 0, logits.astype(jnp.float32), 0.0)
  z = jnp.where(weights > 0, targets.astype(jnp.float32), 0.0)
  bce = jnp.maximum(x, 0.0) - x * z + jnp.log1p(jnp.exp(-jnp.abs(x)))
  return losses.weighted_mean(bce.reshape(-1), weights.reshape(-1))


def finding_aucs(p: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> list[float]:
  """ROC AUC of each finding [N] over labelled images (NaN where one class is absent)."""
  return [roc_auc(p[:, k], targets[:, k], weights[:, k]) for k in range(p.shape[1])]


def macro_auc(aucs: list[float]) -> float:
  """Mean of the finite per-finding AUCs (NaN when none)."""
  finite = [a for a in aucs if np.isfinite(a)]
  return float(np.mean(finite)) if finite else float("nan")


@flax.struct.dataclass
class MacroAUC(clu_metrics.CollectingMetric.from_outputs(("p", "targets", "weights"))):
  """Macro ROC AUC over findings, every example merged (collected on the host)."""

  @classmethod
  def from_model_output(
    cls,
    finding_logits: jax.Array,
    findings: jax.Array,
    findings_weight: jax.Array,
    weight: jax.Array,
    **_,
  ) -> "MacroAUC":
    return super().from_model_output(
      p=jax.nn.sigmoid(finding_logits), targets=findings, weights=findings_weight * weight[:, None]
    )

  def compute(self) -> float:
    if not self.values:
      return float("nan")
    values = super().compute()
    return macro_auc(finding_aucs(values["p"], values["targets"], values["weights"]))


@flax.struct.dataclass
class FindingsLoss(metrics.WeightedAverage):
  @classmethod
  def from_model_output(
    cls, loss: jax.Array, findings_weight: jax.Array, weight: jax.Array, **_
  ) -> metrics.WeightedAverage:
    return cls.from_values(loss, jnp.max(findings_weight, axis=-1) * weight)


@flax.struct.dataclass
class FindingMetrics(metrics.FloatCollection):
  """Keyword inputs: finding_logits [B,N], findings [B,N], findings_weight [B,N], weight,
  loss. compute() -> {'findings_auc' (macro), 'loss'}."""

  findings_auc: MacroAUC
  loss: FindingsLoss
