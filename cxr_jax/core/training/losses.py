"""Training losses: BCE + soft Dice for lung masks, cross-entropy for normal/abnormal.

Every loss is a weighted mean over examples, `sum(w * loss_i) / max(sum(w), eps)`:

- `w` is 1 for an example that counts and 0 for one that does not (padding, or an image
  without a lung mask in the segmentation loss: pass `has_mask * weight`).
- An example with `w == 0` is ignored exactly: its inputs and its per-example loss are
  replaced by 0 with `jnp.where` (not multiplied by 0), so its logits and targets change
  neither the loss nor the gradient, bit for bit, even if they are garbage (inf, NaN).
- A batch whose weights are all 0 gives loss 0 and gradient 0 (not NaN).
- Called inside `jax.jit` on global arrays sharded over the mesh's `data` axis, the sums
  are over the global batch (all devices, all hosts): the normalisation is global, so an
  uneven spread of masked images over devices does not change the loss. Never take a
  per-device mean (no `shard_map`/`pmap` around these functions).
"""

import jax
import jax.numpy as jnp

# Smallest denominator of the weighted mean: an all-zero-weight batch gives 0, not 0/0.
_EPS = 1e-8


def weighted_mean(values: jax.Array, weight: jax.Array) -> jax.Array:
  """`sum(w * v) / max(sum(w), eps)` over the batch; entries with `w <= 0` count for nothing.

  Args:
    values: [B] float, one value per example.
    weight: [B] float (or bool), 1 for examples that count, 0 for the others.

  Returns:
    A float32 scalar.
  """
  values = jnp.asarray(values, jnp.float32)
  weight = jnp.asarray(weight, jnp.float32)
  if values.shape != weight.shape:
    raise ValueError(
      f"values {values.shape} and weight {weight.shape} must have the same [B] shape."
    )
  counts = weight > 0
  total = jnp.sum(jnp.where(counts, weight * values, 0.0))
  return total / jnp.maximum(jnp.sum(jnp.where(counts, weight, 0.0)), _EPS)


def _check_mask_shapes(mask_logits: jax.Array, mask: jax.Array) -> None:
  if mask_logits.shape != mask.shape or mask_logits.ndim != 4:
    raise ValueError(
      f"mask_logits {mask_logits.shape} and mask {mask.shape} must both be [B, H, W, 1]."
    )


def segmentation_loss_per_image(
  mask_logits: jax.Array, mask: jax.Array, *, smooth: float = 1.0
) -> dict[str, jax.Array]:
  """Per-image parts of the segmentation loss.

  Args:
    mask_logits: [B, H, W, 1] float logits of "lung".
    mask: [B, H, W, 1] float/int/bool target in {0, 1}.
    smooth: added to the numerator and denominator of the soft Dice (in pixels), so an empty
      mask with an empty prediction scores 1 and the gradient stays finite.

  Returns:
    'bce': [B] binary cross-entropy from logits, mean over pixels (numerically stable).
    'dice': [B] soft Dice of sigmoid(logits) with the mask.
  """
  _check_mask_shapes(mask_logits, mask)
  x = mask_logits.astype(jnp.float32)
  z = mask.astype(jnp.float32)
  axes = (1, 2, 3)
  # log(1 + exp(-|x|)) never overflows; max(x, 0) - x z is exact for large |x|.
  bce = jnp.mean(jnp.maximum(x, 0.0) - x * z + jnp.log1p(jnp.exp(-jnp.abs(x))), axis=axes)
  p = jax.nn.sigmoid(x)
  intersection = jnp.sum(p * z, axis=axes)
  dice = (2.0 * intersection + smooth) / (jnp.sum(p, axis=axes) + jnp.sum(z, axis=axes) + smooth)
  return {"bce": bce, "dice": dice}


def segmentation_loss(
  mask_logits: jax.Array,
  mask: jax.Array,
  weight: jax.Array,
  dice_weight: float = 1.0,
  *,
  smooth: float = 1.0,
) -> jax.Array:
  """BCE + dice_weight * (1 - soft Dice), per image, then the weighted mean over images.

  Args:
    mask_logits: [B, H, W, 1] float logits.
    mask: [B, H, W, 1] target in {0, 1}.
    weight: [B] float; pass `has_mask * weight` so images without a mask and padding are
      ignored exactly.
    dice_weight: weight of the soft-Dice term (`config.loss.dice_weight`).
    smooth: soft-Dice smoothing, in pixels.

  Returns:
    A float32 scalar, normalised by the global sum of weights (see the module docstring).
  """
  _check_mask_shapes(mask_logits, mask)
  # Zeroed inputs keep even a NaN logit of an ignored image out of the gradient.
  counts = (jnp.asarray(weight) > 0)[:, None, None, None]
  parts = segmentation_loss_per_image(
    jnp.where(counts, mask_logits, 0), jnp.where(counts, mask, 0), smooth=smooth
  )
  return weighted_mean(parts["bce"] + dice_weight * (1.0 - parts["dice"]), weight)


def deep_supervision_loss(
  aux_logits: list[jax.Array], mask: jax.Array, weight: jax.Array, dice_weight: float = 1.0
) -> tuple[jax.Array, float]:
  """nnU-Net's deep supervision: `segmentation_loss` of each auxiliary head k = 1..K
  ([B, H/2**k, W/2**k, 1]) against the mask average-pooled by 2**k (a soft target: a pixel
  half lung is 0.5), weighted 2**-k. Returns (the weighted sum, the sum of the weights)."""
  total, weights = 0.0, 0.0
  b, h, w, c = mask.shape
  for k, logits in enumerate(aux_logits, start=1):
    f = 2**k
    pooled = mask.astype(jnp.float32).reshape(b, h // f, f, w // f, f, c).mean(axis=(2, 4))
    total += 0.5**k * segmentation_loss(logits, pooled, weight, dice_weight)
    weights += 0.5**k
  return total, weights


def _check_class_shapes(class_logits: jax.Array, label: jax.Array) -> None:
  if class_logits.ndim != 2 or label.shape != class_logits.shape[:1]:
    raise ValueError(
      f"class_logits {class_logits.shape} must be [B, C] and label {label.shape} must be [B]."
    )


def classification_loss_per_example(class_logits: jax.Array, label: jax.Array) -> jax.Array:
  """Softmax cross-entropy with integer labels: [B, C] logits, [B] labels -> [B]."""
  _check_class_shapes(class_logits, label)
  log_p = jax.nn.log_softmax(class_logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(log_p, label.astype(jnp.int32)[:, None], axis=-1)[:, 0]


def classification_loss(class_logits: jax.Array, label: jax.Array, weight: jax.Array) -> jax.Array:
  """Weighted mean softmax cross-entropy.

  Args:
    class_logits: [B, C] float logits.
    label: [B] int class index (0 normal, 1 abnormal).
    weight: [B] float, 0 for padding.

  Returns:
    A float32 scalar, normalised by the global sum of weights.
  """
  _check_class_shapes(class_logits, label)
  counts = jnp.asarray(weight) > 0
  per_example = classification_loss_per_example(
    jnp.where(counts[:, None], class_logits, 0), jnp.where(counts, label, 0)
  )
  return weighted_mean(per_example, weight)
