"""U-Net (Ronneberger et al. 2015) with padded convolutions, and its multi-task variant.

Parameter count of the published configuration (depth 4, base 64, 1 input channel, 1 output
channel, norm='none', upsample='transpose'); a 3x3 conv Cin->Cout has 9*Cin*Cout + Cout:
  encoder   1->64->64           640 + 36,928              =     37,568
            64->128->128     73,856 + 147,584             =    221,440
            128->256->256   295,168 + 590,080             =    885,248
            256->512->512 1,180,160 + 2,359,808           =  3,539,968
  bottleneck 512->1024->1024 4,719,616 + 9,438,208        = 14,157,824
  decoder   up 1024->512 (2x2: 4*1024*512 + 512) 2,097,664
            + 1024->512->512 4,719,104 + 2,359,808        =  9,176,576
            up 512->256 524,544 + 512->256->256 1,179,904 + 590,080 = 2,294,528
            up 256->128 131,200 + 256->128->128 295,040 + 147,584   =   573,824
            up 128->64   32,832 + 128->64->64    73,792 +  36,928   =   143,552
  head      1x1 64->1                                     =         65
  total                                                   = 31,030,593  (the published 31.0M)
With norm='batch' or 'group' each of the 18 3x3 convs loses its bias (Cout) and its norm adds
a scale and a shift (2*Cout): + sum(Cout) = 5,888 -> 31,036,481 parameters (plus 11,776
BatchNorm running statistics, which are not parameters).
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cxr_jax import errors
from cxr_jax.core.models import layers
from cxr_jax.data.findings import parse_names as finding_names
from cxr_jax.data.records import EXTRA_STRUCTURES


class UNet(nnx.Module):
  """U-Net for binary segmentation: x [B, H, W, in_features] -> {'mask_logits': [B, H, W, 1]}.

  H and W must be multiples of 2**depth (non-square is fine). With `structures`, the same
  1x1 head also gives 'structure_logits' [B, H, W, len(anatomy.EXTRA)] (heart, clavicles);
  with `findings` > 0, a dense layer on the pooled bottleneck gives 'finding_logits'
  [B, findings]. With `deep_supervision` = K > 0, training (only) also returns
  'aux_mask_logits': a 1x1 head's lung logits on each of the K decoder levels below full
  resolution, [B, H/2**k, W/2**k, 1] for k = 1..K (nnU-Net's deep supervision).
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
    structures: bool = False,
    findings: int = 0,
    deep_supervision: int = 0,
    rngs: nnx.Rngs,
  ):
    if not 0 <= deep_supervision < depth:
      raise errors.ConfigError(
        f"config.model.deep_supervision={deep_supervision}: the decoder has {depth - 1} "
        f"levels below full resolution (model.depth={depth}); use 0..{depth - 1}."
      )
    self.depth = depth
    self.num_structures = len(EXTRA_STRUCTURES) if structures else 0
    out_features += self.num_structures
    self.dtype = layers.compute_dtype(dtype)
    self.encoder = layers.Encoder(
      in_features,
      base_features=base_features,
      depth=depth,
      norm=norm,
      dropout=dropout,
      dtype=self.dtype,
      rngs=rngs,
    )
    self.decoder = layers.Decoder(
      self.encoder.widths,
      norm=norm,
      dropout=dropout,
      upsample=upsample,
      dtype=self.dtype,
      rngs=rngs,
    )
    # Logits in float32: they feed BCE and Dice, and the 1x1 conv is cheap.
    self.head = nnx.Conv(base_features, out_features, (1, 1), dtype=jnp.float32, rngs=rngs)
    self.finding_head = (
      nnx.Linear(self.encoder.widths[-1], findings, rngs=rngs) if findings else None
    )
    self.aux_heads = nnx.List(
      [
        nnx.Conv(self.encoder.widths[k], 1, (1, 1), dtype=jnp.float32, rngs=rngs)
        for k in range(1, deep_supervision + 1)
      ]
    )

  @staticmethod
  def config_kwargs(model_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The `config.model` keys every U-Net variant takes, as constructor arguments."""
    return dict(
      base_features=model_config.base_features,
      depth=model_config.depth,
      norm=model_config.norm,
      dropout=model_config.dropout,
      upsample=model_config.upsample,
      dtype=model_config.dtype,
      deep_supervision=int(model_config.get("deep_supervision", 0)),
    )

  @classmethod
  def from_config(cls, model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> "UNet":
    """Builds the model from `config.model` (base_features, depth, norm, dropout, ...,
    structures, findings)."""
    return cls(
      **cls.config_kwargs(model_config),
      structures=bool(model_config.structures),
      findings=len(finding_names(model_config.findings)),
      rngs=rngs,
    )

  def features(
    self,
    x: jax.Array,
    *,
    train: bool,
    gates: Sequence[nnx.Module] | None = None,
    model: str = "UNet",
  ) -> tuple[jax.Array, jax.Array, list[jax.Array], dict[str, Any]]:
    """The one forward pass every U-Net variant wraps: x [B, H, W, C] -> (the head's logits
    [B, H, W, 1 + structure channels] float32, bottleneck features, gate maps finest first:
    [] without `gates`, the deep-supervision outputs: {'aux_mask_logits': [...]} in training
    with `deep_supervision`, else {}). `model` names the caller in the input check's message."""
    layers.check_input(x, 2**self.depth, model)
    skips, bottleneck = self.encoder(x.astype(self.dtype), train=train)
    levels, alphas = self.decoder(bottleneck, skips, train=train, gates=gates)
    aux = {}
    if train and len(self.aux_heads):
      aux["aux_mask_logits"] = [
        head(level).astype(jnp.float32) for head, level in zip(self.aux_heads, levels[1:])
      ]
    return self.head(levels[0]).astype(jnp.float32), bottleneck, alphas, aux

  def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    logits, bottleneck, _, aux = self.features(x, train=train)
    outputs = {"mask_logits": logits[..., :1], **aux}
    if self.num_structures:
      outputs["structure_logits"] = logits[..., 1:]
    if self.finding_head is not None:
      pooled = layers.global_average_pool(bottleneck)
      outputs["finding_logits"] = self.finding_head(pooled).astype(jnp.float32)
    return outputs


class MultiTaskUNet(nnx.Module):
  """U-Net whose bottleneck also feeds a normal/abnormal head (shared encoder).

  x [B, H, W, 1] -> {'mask_logits': [B, H, W, 1], 'class_logits': [B, num_classes]}. The
  class head is global average pooling of the bottleneck, dropout, and a dense layer
  (base_features * 2**depth * num_classes + num_classes parameters on top of the U-Net).
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
    num_classes: int = 2,
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
    self.class_dropout = layers.Dropout(dropout, rngs=rngs)
    self.class_head = nnx.Linear(self.unet.encoder.widths[-1], num_classes, rngs=rngs)

  @classmethod
  def from_config(
    cls, model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs
  ) -> "MultiTaskUNet":
    """Builds the model from `config.model` (the U-Net keys plus num_classes)."""
    return cls(**UNet.config_kwargs(model_config), num_classes=model_config.num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    mask_logits, bottleneck, _, aux = self.unet.features(x, train=train, model="MultiTaskUNet")
    pooled = self.class_dropout(layers.global_average_pool(bottleneck), train=train)
    class_logits = self.class_head(pooled).astype(jnp.float32)
    return {"mask_logits": mask_logits, "class_logits": class_logits, **aux}
