"""ResNet-18/34/50 encoders (He et al. 2016), laid out as torchvision and timm lay them out.

Attribute names follow torchvision's `ResNet` (conv1, bn1, layer1..layer4, each block's
conv1/bn1/conv2/bn2[/conv3/bn3] and downsample.0/.1), so a PyTorch state dict maps onto the
Flax parameters by name (cxr_jax/core/models/pretrained.py). torchvision's v1.5 Bottleneck
strides in its 3x3 convolution, as timm's does. Padding is explicit and symmetric, as in
PyTorch (Flax's 'SAME' pads a stride-2 convolution on an even input asymmetrically).

The encoder returns the features at strides 2, 4, 8, 16, 32 (after the stem's ReLU and
after each stage): the skips a U-Net decoder takes, as segmentation_models_pytorch's.
"""

import jax
import jax.numpy as jnp
from flax import nnx

# name -> (block, blocks per stage)
ARCHITECTURES = {
  "resnet18": ("basic", (2, 2, 2, 2)),
  "resnet34": ("basic", (3, 4, 6, 3)),
  "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}
BN_EPSILON = 1e-5  # PyTorch's
BN_MOMENTUM = 0.9  # PyTorch's momentum 0.1, in Flax's convention


def conv(
  cin: int, cout: int, k: int, *, strides: int = 1, dtype: jnp.dtype, rngs: nnx.Rngs
) -> nnx.Conv:
  """A k x k convolution without bias, padded by k // 2 on every side (PyTorch's padding)."""
  pad = k // 2
  return nnx.Conv(
    cin,
    cout,
    (k, k),
    strides=strides,
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    dtype=dtype,
    kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
    rngs=rngs,
  )


def batch_norm(features: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """BatchNorm with PyTorch's epsilon and momentum."""
  return nnx.BatchNorm(features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, rngs=rngs)


def max_pool_3x3(x: jax.Array) -> jax.Array:
  """3x3 max-pool, stride 2, padding 1 (padded with -inf, as PyTorch's)."""
  return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class Block(nnx.Module):
  """A basic (two 3x3) or bottleneck (1x1, 3x3, 1x1) residual block."""

  def __init__(
    self, kind: str, cin: int, planes: int, *, strides: int, dtype: jnp.dtype, rngs: nnx.Rngs
  ):
    cout = planes * EXPANSION[kind]
    self.kind = kind
    if kind == "basic":
      self.conv1 = conv(cin, planes, 3, strides=strides, dtype=dtype, rngs=rngs)
      self.bn1 = batch_norm(planes, dtype=dtype, rngs=rngs)
      self.conv2 = conv(planes, planes, 3, dtype=dtype, rngs=rngs)
      self.bn2 = batch_norm(planes, dtype=dtype, rngs=rngs)
    else:
      self.conv1 = conv(cin, planes, 1, dtype=dtype, rngs=rngs)
      self.bn1 = batch_norm(planes, dtype=dtype, rngs=rngs)
      self.conv2 = conv(planes, planes, 3, strides=strides, dtype=dtype, rngs=rngs)
      self.bn2 = batch_norm(planes, dtype=dtype, rngs=rngs)
      self.conv3 = conv(planes, cout, 1, dtype=dtype, rngs=rngs)
      self.bn3 = batch_norm(cout, dtype=dtype, rngs=rngs)
    if strides != 1 or cin != cout:
      self.downsample = nnx.List(
        [
          conv(cin, cout, 1, strides=strides, dtype=dtype, rngs=rngs),
          batch_norm(cout, dtype=dtype, rngs=rngs),
        ]
      )
    else:
      self.downsample = None

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    frozen = not train
    y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=frozen))
    y = self.bn2(self.conv2(y), use_running_average=frozen)
    if self.kind == "bottleneck":
      y = self.bn3(self.conv3(jax.nn.relu(y)), use_running_average=frozen)
    shortcut = x
    if self.downsample is not None:
      shortcut = self.downsample[1](self.downsample[0](x), use_running_average=frozen)
    return jax.nn.relu(y + shortcut)


class ResNetEncoder(nnx.Module):
  """torchvision's ResNet without its pooling and fc: x [B, H, W, Cin] -> 5 feature maps."""

  def __init__(
    self,
    name: str,
    *,
    in_features: int = 1,
    widths: tuple[int, ...] = (64, 128, 256, 512),
    stem_width: int = 64,
    dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    kind, counts = ARCHITECTURES[name]
    self.conv1 = conv(in_features, stem_width, 7, strides=2, dtype=dtype, rngs=rngs)
    self.bn1 = batch_norm(stem_width, dtype=dtype, rngs=rngs)
    cin = stem_width
    for i, (planes, count) in enumerate(zip(widths, counts)):
      blocks = []
      for j in range(count):
        blocks.append(
          Block(kind, cin, planes, strides=2 if (i and not j) else 1, dtype=dtype, rngs=rngs)
        )
        cin = planes * EXPANSION[kind]
      setattr(self, f"layer{i + 1}", nnx.List(blocks))
    # Channels of the features at strides 2, 4, 8, 16, 32.
    self.channels = (stem_width, *(w * EXPANSION[kind] for w in widths))

  def __call__(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
    x = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
    features = [x]
    x = max_pool_3x3(x)
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in stage:
        x = block(x, train=train)
      features.append(x)
    return features

  def head_input(self, deepest: jax.Array) -> jax.Array:
    """What torchvision pools before its fc: the last stage's output."""
    return deepest


def resnet_encoder(name: str):
  """The registry's builder for `config.model.encoder=name`."""

  def build(*, in_features: int, dtype: jnp.dtype, rngs: nnx.Rngs) -> ResNetEncoder:
    return ResNetEncoder(name, in_features=in_features, dtype=dtype, rngs=rngs)

  return build
