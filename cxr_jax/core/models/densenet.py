"""DenseNet-121 encoder (Huang et al. 2017), laid out as torchvision and TorchXRayVision do.

Attribute names follow torchvision's `DenseNet.features` (conv0, norm0, denseblock1..4 of
denselayer1..N with norm1/conv1/norm2/conv2, transition1..3 with norm/conv, norm5), so
torchvision's and TorchXRayVision's state dicts map onto it by name (pretrained.py).

Features at strides 2, 4, 8, 16, 32, as segmentation_models_pytorch's DenseNet encoder takes
them: the stem's ReLU, each transition's output before its average pooling, and norm5.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from cxr_jax.core.models.resnet import batch_norm
from cxr_jax.core.models.resnet import conv
from cxr_jax.core.models.resnet import max_pool_3x3

# name -> (growth rate, layers per block, stem width, bottleneck multiplier)
ARCHITECTURES = {"densenet121": (32, (6, 12, 24, 16), 64, 4)}


class DenseLayer(nnx.Module):
  """BN-ReLU-1x1 conv-BN-ReLU-3x3 conv; its `growth` new channels join the input's."""

  def __init__(self, cin: int, growth: int, bn_size: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.norm1 = batch_norm(cin, dtype=dtype, rngs=rngs)
    self.conv1 = conv(cin, bn_size * growth, 1, dtype=dtype, rngs=rngs)
    self.norm2 = batch_norm(bn_size * growth, dtype=dtype, rngs=rngs)
    self.conv2 = conv(bn_size * growth, growth, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    y = self.conv1(jax.nn.relu(self.norm1(x, use_running_average=not train)))
    y = self.conv2(jax.nn.relu(self.norm2(y, use_running_average=not train)))
    return jnp.concatenate([x, y], axis=-1)


class Transition(nnx.Module):
  """BN-ReLU-1x1 conv halving the channels (the 2x2 average pooling is the caller's)."""

  def __init__(self, cin: int, cout: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.norm = batch_norm(cin, dtype=dtype, rngs=rngs)
    self.conv = conv(cin, cout, 1, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    return self.conv(jax.nn.relu(self.norm(x, use_running_average=not train)))


class DenseNetFeatures(nnx.Module):
  """torchvision's `DenseNet.features`: x [B, H, W, Cin] -> 5 feature maps."""

  def __init__(
    self,
    *,
    in_features: int,
    growth: int,
    blocks: tuple[int, ...],
    stem_width: int,
    bn_size: int,
    dtype: jnp.dtype,
    rngs: nnx.Rngs,
  ):
    self.conv0 = conv(in_features, stem_width, 7, strides=2, dtype=dtype, rngs=rngs)
    self.norm0 = batch_norm(stem_width, dtype=dtype, rngs=rngs)
    width = stem_width
    self.channels = [stem_width]
    for i, count in enumerate(blocks):
      block = nnx.Dict()
      for j in range(count):
        block[f"denselayer{j + 1}"] = DenseLayer(
          width + j * growth, growth, bn_size, dtype=dtype, rngs=rngs
        )
      setattr(self, f"denseblock{i + 1}", block)
      width += count * growth
      if i < len(blocks) - 1:
        setattr(self, f"transition{i + 1}", Transition(width, width // 2, dtype=dtype, rngs=rngs))
        width //= 2
        self.channels.append(width)
    self.norm5 = batch_norm(width, dtype=dtype, rngs=rngs)
    self.channels.append(width)
    self.num_blocks = len(blocks)

  def __call__(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
    x = jax.nn.relu(self.norm0(self.conv0(x), use_running_average=not train))
    features = [x]
    x = max_pool_3x3(x)
    for i in range(1, self.num_blocks + 1):
      block = getattr(self, f"denseblock{i}")
      for j in range(1, len(block) + 1):
        x = block[f"denselayer{j}"](x, train=train)
      if i < self.num_blocks:
        x = getattr(self, f"transition{i}")(x, train=train)
        features.append(x)
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
    features.append(self.norm5(x, use_running_average=not train))
    return features


class DenseNetEncoder(nnx.Module):
  """The encoder under the `features` name its state dicts use."""

  def __init__(
    self,
    *,
    in_features: int = 1,
    growth: int = 32,
    blocks: tuple[int, ...] = (6, 12, 24, 16),
    stem_width: int = 64,
    bn_size: int = 4,
    dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.features = DenseNetFeatures(
      in_features=in_features,
      growth=growth,
      blocks=blocks,
      stem_width=stem_width,
      bn_size=bn_size,
      dtype=dtype,
      rngs=rngs,
    )
    self.channels = tuple(self.features.channels)

  def __call__(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
    return self.features(x, train=train)

  def head_input(self, deepest: jax.Array) -> jax.Array:
    """What torchvision pools before its classifier: ReLU of norm5."""
    return jax.nn.relu(deepest)


def densenet_encoder(name: str):
  """The registry's builder for `config.model.encoder=name`."""
  growth, blocks, stem_width, bn_size = ARCHITECTURES[name]

  def build(*, in_features: int, dtype: jnp.dtype, rngs: nnx.Rngs) -> DenseNetEncoder:
    return DenseNetEncoder(
      in_features=in_features,
      growth=growth,
      blocks=blocks,
      stem_width=stem_width,
      bn_size=bn_size,
      dtype=dtype,
      rngs=rngs,
    )

  return build
