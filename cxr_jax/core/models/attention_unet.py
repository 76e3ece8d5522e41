"""Attention U-Net (Oktay et al. 2018): the U-Net with additive attention gates on the skips.

Each gate weighs skip features x_l [B, H, W, F_l] by coefficients alpha in [0, 1] computed
from x_l and the gating signal g (the decoder features one level coarser, [B, H/2, W/2, F_g]):

  q = psi(relu(theta_x(x_l) + phi_g(g))),  alpha = upsample(sigmoid(q)),  out = alpha * x_l

theta_x is a 2x2 stride-2 conv (no bias) that brings x_l to g's grid, phi_g and psi are 1x1
convs (with bias), F_int = F_l / 2, and alpha is resampled bilinearly back to x_l's grid
(Oktay et al., Fig. 2). Gating on the coarse grid is 4x cheaper than at the skip's own.

Gate parameters: 4*F_l*F_int + (F_g*F_int + F_int) + (F_int + 1) with F_g = 2*F_l. At depth 4,
base 64: 12,353 + 49,281 + 196,865 + 786,945 = 1,045,444 on top of the U-Net
(31,030,593 -> 32,076,037 with norm='none'; 31,036,481 -> 32,081,925 with norm='batch').
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cxr_jax.core.models import layers
from cxr_jax.core.models.unet import UNet


class AttentionGate(nnx.Module):
  """Additive attention gate: (skip [B,H,W,F_l], g [B,H/2,W/2,F_g]) -> (gated skip, alpha)."""

  def __init__(
    self,
    skip_features: int,
    gate_features: int,
    inter_features: int,
    *,
    dtype: jnp.dtype,
    rngs: nnx.Rngs,
  ):
    self.theta_x = nnx.Conv(
      skip_features,
      inter_features,
      (2, 2),
      strides=2,
      padding="VALID",
      use_bias=False,
      dtype=dtype,
      rngs=rngs,
    )
    self.phi_g = nnx.Conv(gate_features, inter_features, (1, 1), dtype=dtype, rngs=rngs)
    self.psi = nnx.Conv(inter_features, 1, (1, 1), dtype=dtype, rngs=rngs)

  def __call__(self, skip: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (alpha * skip in skip's dtype, alpha [B, H, W, 1] float32 in [0, 1])."""
    q = self.psi(jax.nn.relu(self.theta_x(skip) + self.phi_g(g)))
    alpha = layers.resize_2x(jax.nn.sigmoid(q.astype(jnp.float32)))
    return skip * alpha.astype(skip.dtype), alpha


class AttentionUNet(nnx.Module):
  """U-Net with attention-gated skips.

  x [B, H, W, 1] -> {'mask_logits': [B, H, W, 1]}, plus, with `return_attention=True`,
  'attention': one map [B, H/2**i, W/2**i, 1] float32 in [0, 1] per skip level i, finest
  (full resolution) first.
  """

  def __init__(
    self,
    *,
    in_features: int = 1,
    out_features: int = 1,
    base_features: int = 64,
    depth: int = 4,
    norm: str = "batch",
    dropout: float = 0.0,
    upsample: str = "transpose",
    dtype: str = "float32",
    deep_supervision: int = 0,
    rngs: nnx.Rngs,
  ):
    self.unet = UNet(
      in_features=in_features,
      out_features=out_features,
      base_features=base_features,
      depth=depth,
      norm=norm,
      dropout=dropout,
      upsample=upsample,
      dtype=dtype,
      deep_supervision=deep_supervision,
      rngs=rngs,
    )
    widths = self.unet.encoder.widths
    self.gates = nnx.List(
      [
        AttentionGate(
          widths[i], widths[i + 1], max(widths[i] // 2, 1), dtype=self.unet.dtype, rngs=rngs
        )
        for i in range(depth)
      ]
    )

  @classmethod
  def from_config(
    cls, model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs
  ) -> "AttentionUNet":
    """Builds the model from `config.model` (same keys as the U-Net)."""
    return cls(**UNet.config_kwargs(model_config), rngs=rngs)

  def __call__(
    self, x: jax.Array, *, train: bool, return_attention: bool = False
  ) -> dict[str, jax.Array | list[jax.Array]]:
    mask_logits, _, alphas, aux = self.unet.features(
      x, train=train, gates=self.gates, model="AttentionUNet"
    )
    out = {"mask_logits": mask_logits, **aux}
    if return_attention:
      out["attention"] = alphas
    return out
