"""Structures beyond the lungs (heart, clavicles): their loss, validation metrics, and how
their masks ride through augmentation (the cardiothoracic ratio: `stats.cardiothoracic`).

The lungs stay the `mask_logits` head; `structure_logits` [B, H, W, K] holds one channel per
name of `EXTRA` (K = 2), learnt where `has_structures` says an image outlines it. Images
without an outline of a structure (the Kaggle archive's heart, CheXmask's clavicles) train
the other heads as they are.
"""

import flax
import jax
import jax.numpy as jnp

from cxr_jax.core.stats import metrics
from cxr_jax.core.training import losses
from cxr_jax.data.records import EXTRA_STRUCTURES as EXTRA  # structure_logits' channels


def structure_loss(
  logits: jax.Array, structures: jax.Array, outlined: jax.Array, dice_weight: float
) -> jax.Array:
  """Mean over channels of `losses.segmentation_loss` per structure.

  Args:
    logits: [B, H, W, K]; structures: [B, H, W, K] in {0, 1}; outlined: [B, K] weights
      (`has_structures * weight`): 0 where an image does not outline a structure.
  """
  parts = [
    losses.segmentation_loss(
      logits[..., k : k + 1], structures[..., k : k + 1], outlined[:, k], dice_weight
    )
    for k in range(logits.shape[-1])
  ]
  # A structure no image of the batch outlines adds 0 (weighted_mean of nothing is 0).
  return sum(parts) / len(parts)


def _structure_dice(index: int) -> type[metrics.WeightedAverage]:
  @flax.struct.dataclass
  class StructureDice(metrics.WeightedAverage):
    @classmethod
    def from_model_output(
      cls,
      structure_logits: jax.Array,
      structures: jax.Array,
      has_structures: jax.Array,
      weight: jax.Array,
      **_,
    ) -> metrics.WeightedAverage:
      scores = metrics.segmentation_scores(
        structure_logits[..., index : index + 1], structures[..., index : index + 1]
      )
      return cls.from_values(scores["dice"], has_structures[:, index] * weight)

  StructureDice.__name__ = StructureDice.__qualname__ = f"{EXTRA[index].capitalize()}Dice"
  return StructureDice


@flax.struct.dataclass
class StructureLoss(metrics.WeightedAverage):
  @classmethod
  def from_model_output(
    cls, loss: jax.Array, has_structures: jax.Array, weight: jax.Array, **_
  ) -> metrics.WeightedAverage:
    return cls.from_values(loss, jnp.max(has_structures, axis=-1) * weight)


@flax.struct.dataclass
class StructureMetrics(metrics.FloatCollection):
  """Keyword inputs: structure_logits, structures [B,H,W,K], has_structures [B,K], weight,
  loss. compute() -> {'heart_dice', 'clavicles_dice', 'loss'} (NaN: none outlined)."""

  heart_dice: _structure_dice(EXTRA.index("heart"))
  clavicles_dice: _structure_dice(EXTRA.index("clavicles"))
  loss: StructureLoss


# ----- augmentation: all masks as one integer channel -----


def pack(mask: jax.Array, structures: jax.Array | None) -> jax.Array:
  """[B,S,S,1] lungs and [B,S,S,K] structures -> [B,S,S,1]: bit 0 the lungs, bit k+1
  structure k. Nearest-neighbour resampling (how augmentation moves masks) keeps the bits."""
  if structures is None:
    return mask
  weights = 2.0 ** jnp.arange(1, structures.shape[-1] + 1, dtype=jnp.float32)
  return mask + jnp.sum(structures * weights, axis=-1, keepdims=True)


def unpack(packed: jax.Array, num_structures: int) -> tuple[jax.Array, jax.Array | None]:
  """The inverse of `pack`: (mask [B,S,S,1], structures [B,S,S,K] or None)."""
  if not num_structures:
    return packed, None
  bits = jnp.round(packed).astype(jnp.int32)
  shifts = jnp.arange(num_structures + 1, dtype=jnp.int32)
  planes = ((bits >> shifts) & 1).astype(packed.dtype)  # [B,S,S,1+K]
  return planes[..., :1], planes[..., 1:]
