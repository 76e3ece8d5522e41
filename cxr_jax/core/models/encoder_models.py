"""The U-Net, multi-task U-Net and classifier on a named encoder (`config.model.encoder`).

The U-Net decoder is segmentation_models_pytorch's: five blocks from the deepest features
(stride 32) up, each a nearest 2x upsampling, the concatenated skip at that stride (none at
full resolution), and two 3x3 conv-norm-ReLU; widths base_features * (16, 8, 4, 2, 1). The
classifier pools what the encoder's own ImageNet head pools (a ResNet's last stage, a
DenseNet's ReLU(norm5)) into a dense layer under the name `head`.

`input_scale` multiplies the (per-image z-scored) input before the encoder: 1 for ImageNet
weights, whose normalised inputs are also ~zero mean and unit std; TorchXRayVision's models
expect pixels in [-1024, 1024] (pretrained.py sets it and config.json records it).
`freeze_bn`: the encoder's BatchNorm uses its running statistics in training too.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cxr_jax.core.models import layers

STRIDE = 32  # the encoders' deepest stride: image sides must be multiples of it


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, 2H, 2W, C], each pixel repeated (PyTorch's 'nearest')."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class _EncoderModel(nnx.Module):
  """The parts every encoder model shares: the encoder, its input scale and BN switch."""

  def _init_encoder(self, build: Callable, model_config: ml_collections.ConfigDict, rngs):
    self.dtype = layers.compute_dtype(model_config.dtype)
    self.encoder = build(in_features=1, dtype=self.dtype, rngs=rngs)
    self.input_scale = float(model_config.get("input_scale", 1.0))
    self.freeze_bn = bool(model_config.get("freeze_bn", False))

  def _features(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
    layers.check_input(x, STRIDE, type(self).__name__)
    x = (x * self.input_scale).astype(self.dtype)
    return self.encoder(x, train=train and not self.freeze_bn)


class EncoderUNet(_EncoderModel):
  """x [B, H, W, 1] -> {'mask_logits'} (and {'class_logits'} when num_classes > 0)."""

  def __init__(
    self,
    build: Callable,
    model_config: ml_collections.ConfigDict,
    *,
    num_classes: int = 0,
    rngs: nnx.Rngs,
  ):
    self._init_encoder(build, model_config, rngs)
    norm, dropout = model_config.norm, model_config.dropout
    widths = [model_config.base_features * 2**i for i in (4, 3, 2, 1, 0)]
    skips = list(reversed(self.encoder.channels[:-1])) + [0]  # strides 16, 8, 4, 2, none
    cin = self.encoder.channels[-1]
    blocks = []
    for width, skip in zip(widths, skips):
      blocks.append(
        layers.DoubleConv(
          cin + skip, width, norm=norm, dropout=dropout, dtype=self.dtype, rngs=rngs
        )
      )
      cin = width
    self.decoder = nnx.List(blocks)
    self.head = nnx.Conv(widths[-1], 1, (1, 1), dtype=jnp.float32, rngs=rngs)
    if num_classes:
      self.class_dropout = layers.Dropout(dropout, rngs=rngs)
      self.class_head = nnx.Linear(self.encoder.channels[-1], num_classes, rngs=rngs)
    else:
      self.class_head = None

  def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    features = self._features(x, train=train)
    skips = list(reversed(features[:-1])) + [None]
    y = features[-1]
    for block, skip in zip(self.decoder, skips):
      y = upsample_nearest_2x(y)
      y = block(y if skip is None else [y, skip.astype(y.dtype)], train=train)
    outputs = {"mask_logits": self.head(y).astype(jnp.float32)}
    if self.class_head is not None:
      pooled = layers.global_average_pool(self.encoder.head_input(features[-1]))
      pooled = self.class_dropout(pooled, train=train)
      outputs["class_logits"] = self.class_head(pooled).astype(jnp.float32)
    return outputs


class EncoderClassifier(_EncoderModel):
  """x [B, H, W, 1] -> {'class_logits': [B, num_classes]}."""

  def __init__(self, build: Callable, model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self._init_encoder(build, model_config, rngs)
    self.dropout = layers.Dropout(model_config.dropout, rngs=rngs)
    self.head = nnx.Linear(self.encoder.channels[-1], model_config.num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    features = self._features(x, train=train)
    pooled = layers.global_average_pool(self.encoder.head_input(features[-1]))
    pooled = self.dropout(pooled, train=train)
    return {"class_logits": self.head(pooled.astype(self.dtype)).astype(jnp.float32)}


def create_encoder_model(
  build: Callable, model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs
) -> nnx.Module:
  """`config.model.name` ('unet' | 'multitask' | 'classifier') on the encoder `build` makes."""
  name = model_config.name
  if name == "unet":
    return EncoderUNet(build, model_config, rngs=rngs)
  if name == "multitask":
    return EncoderUNet(build, model_config, num_classes=model_config.num_classes, rngs=rngs)
  if name == "classifier":
    return EncoderClassifier(build, model_config, rngs=rngs)
  raise ValueError(
    f"config.model.name={name!r} has no variant with config.model.encoder="
    f"{model_config.encoder!r}; use 'unet', 'multitask' or 'classifier', or encoder=''."
  )
