"""Compact ResNet-style CNN for normal/abnormal, on a whole image or a lung crop.

  stem   3x3 conv 1 -> base, norm, ReLU                      (full resolution)
  stage  i = 0..depth-1: two basic blocks (He et al. 2016) with base * 2**(i+1) channels,
         the first with stride 2 and a 1x1 projection shortcut
  head   global average pooling, dropout, dense -> num_classes

The stride is 2**depth, so any H and W that are multiples of it work (whole letterboxed
images and lung crops alike); global pooling makes the head size-independent. The last
norm of each residual branch starts at scale 0 (Goyal et al. 2017), so each block starts as
the identity, which helps small-batch training.

Parameters (norm='batch' or 'group', base b, depth d, C classes; convs have no bias):
  stem 9*b + 2b; stage with Cin -> Cout:
    block 1: 9*Cin*Cout + 9*Cout*Cout + Cin*Cout (projection) + 3 * 2*Cout (norms)
    block 2: 2 * 9*Cout*Cout + 2 * 2*Cout
  head 2**d*b*C + C.  Base 16, depth 4, 2 classes: 2,790,770 (pinned in tests/test_models.py).
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cxr_jax.core.models import layers


class BasicBlock(nnx.Module):
  """Two 3x3 conv-norm layers with a residual shortcut (projected when the shape changes)."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    strides: int,
    norm: str,
    dtype: jnp.dtype,
    rngs: nnx.Rngs,
  ):
    self.conv1 = layers.ConvNormAct(
      in_features, out_features, strides=strides, norm=norm, dtype=dtype, rngs=rngs
    )
    self.conv2 = layers.ConvNormAct(
      out_features, out_features, norm=norm, act=False, zero_init_norm=True, dtype=dtype, rngs=rngs
    )
    if strides != 1 or in_features != out_features:
      self.shortcut = layers.ConvNormAct(
        in_features,
        out_features,
        kernel_size=1,
        strides=strides,
        norm=norm,
        act=False,
        dtype=dtype,
        rngs=rngs,
      )
    else:
      self.shortcut = None

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    residual = x if self.shortcut is None else self.shortcut(x, train=train)
    y = self.conv2(self.conv1(x, train=train), train=train)
    return jax.nn.relu(y + residual)


class Classifier(nnx.Module):
  """x [B, H, W, in_features] -> {'class_logits': [B, num_classes]} (float32)."""

  def __init__(
    self,
    *,
    in_features: int = 1,
    num_classes: int = 2,
    base_features: int = 16,
    depth: int = 4,
    norm: str = "batch",
    dropout: float = 0.0,
    dtype: str = "float32",
    rngs: nnx.Rngs,
  ):
    self.depth = depth
    self.dtype = layers.compute_dtype(dtype)
    self.stem = layers.ConvNormAct(
      in_features, base_features, norm=norm, dtype=self.dtype, rngs=rngs
    )
    blocks = []
    width = base_features
    for i in range(depth):
      out = base_features * 2 ** (i + 1)
      blocks.append(BasicBlock(width, out, strides=2, norm=norm, dtype=self.dtype, rngs=rngs))
      blocks.append(BasicBlock(out, out, strides=1, norm=norm, dtype=self.dtype, rngs=rngs))
      width = out
    self.blocks = nnx.List(blocks)
    self.dropout = layers.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(width, num_classes, rngs=rngs)

  @classmethod
  def from_config(cls, model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> "Classifier":
    """Builds the model from `config.model` (base_features, depth, norm, dropout, ...)."""
    return cls(
      num_classes=model_config.num_classes,
      base_features=model_config.base_features,
      depth=model_config.depth,
      norm=model_config.norm,
      dropout=model_config.dropout,
      dtype=model_config.dtype,
      rngs=rngs,
    )

  def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    layers.check_input(x, 2**self.depth, type(self).__name__)
    x = self.stem(x.astype(self.dtype), train=train)
    for block in self.blocks:
      x = block(x, train=train)
    pooled = self.dropout(layers.global_average_pool(x), train=train)
    return {"class_logits": self.head(pooled).astype(jnp.float32)}
