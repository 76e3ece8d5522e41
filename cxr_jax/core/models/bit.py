"""BiT ResNet-V2 encoders (Kolesnikov et al. 2020), laid out as big_vision lays them out.

Pre-activation bottleneck units with weight-standardised convolutions and GroupNorm (32
groups), as big_vision's `models/bit_paper.py`, the model of the public BiT-S/BiT-M `.npz`
files. Attribute names follow big_vision's (root_block.conv_root, block1..4, unit01.., each
unit's gn1/conv1/gn2/conv2/gn3/conv3[/conv_proj], norm-pre-head as norm_pre_head), so a
checkpoint's names map onto the Flax paths (pretrained.py reads both big_vision's and the
original big_transfer repository's names).

The encoder returns the features at strides 2, 4, 8, 16, 32: the root convolution's output,
blocks 1-3's outputs and ReLU(norm_pre_head(block4)), what BiT's head pools. The root
convolution keeps BiT's 3 input channels: a grey image sees their sum after weight
standardisation, exactly what the RGB model computes on a grey image in R, G and B. GroupNorm
follows the convolutions, so the model is invariant to the input's scale and offset (up to
the image border and epsilon): z-scored inputs need no BiT-specific normalisation.
"""

import re

import jax
import jax.numpy as jnp
from flax import nnx

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
# The public BiT-S / BiT-M checkpoints: R50x1, R50x3, R101x1, R101x3, R152x2, R152x4.
NAMES = ("bit_r50x1", "bit_r50x3", "bit_r101x1", "bit_r101x3", "bit_r152x2", "bit_r152x4")
GROUPS = 32
GN_EPSILON = 1e-5
WS_EPSILON = 1e-10  # big_vision's bit_paper StdConv


def parse(name: str) -> tuple[int, int]:
  """'bit_r50x1' -> (depth 50, width 1)."""
  match = re.fullmatch(r"bit_r(\d+)x(\d+)", name)
  if not match or int(match.group(1)) not in DEPTHS:
    raise ValueError(f"{name!r} is not a BiT encoder; valid: {', '.join(NAMES)}.")
  return int(match.group(1)), int(match.group(2))


def standardize(x: jax.Array, axis: tuple[int, ...], eps: float) -> jax.Array:
  """(x - mean) / sqrt(mean of squared deviations + eps) over `axis`, as big_vision's."""
  x = x - jnp.mean(x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=axis, keepdims=True) + eps)


class StdConv(nnx.Module):
  """A convolution without bias whose HWIO kernel is standardised over H, W and I."""

  def __init__(
    self, cin: int, cout: int, k: int, *, strides: int = 1, dtype: jnp.dtype, rngs: nnx.Rngs
  ):
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")
    self.kernel = nnx.Param(init(rngs.params(), (k, k, cin, cout), jnp.float32))
    self.strides = strides
    self.pad = k // 2
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    w = standardize(self.kernel[...], (0, 1, 2), WS_EPSILON)
    if x.shape[-1] == 1 and w.shape[2] != 1:  # grey image into an RGB root convolution
      w = w.sum(axis=2, keepdims=True)
    return jax.lax.conv_general_dilated(
      x.astype(self.dtype),
      w.astype(self.dtype),
      (self.strides, self.strides),
      ((self.pad, self.pad), (self.pad, self.pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


class GroupNorm(nnx.Module):
  """big_vision's BiT GroupNorm: statistics in float32 over H, W and each group's channels."""

  def __init__(self, features: int, *, dtype: jnp.dtype):
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = x.astype(jnp.float32).reshape(b, h, w, GROUPS, c // GROUPS)
    y = standardize(y, (1, 2, 4), GN_EPSILON).reshape(b, h, w, c)
    return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class Unit(nnx.Module):
  """A pre-activation bottleneck unit: GN-ReLU-conv1x1, GN-ReLU-conv3x3, GN-ReLU-conv1x1."""

  def __init__(self, cin: int, nmid: int, *, strides: int, dtype: jnp.dtype, rngs: nnx.Rngs):
    nout = 4 * nmid
    self.gn1 = GroupNorm(cin, dtype=dtype)
    self.conv1 = StdConv(cin, nmid, 1, dtype=dtype, rngs=rngs)
    self.gn2 = GroupNorm(nmid, dtype=dtype)
    self.conv2 = StdConv(nmid, nmid, 3, strides=strides, dtype=dtype, rngs=rngs)
    self.gn3 = GroupNorm(nmid, dtype=dtype)
    self.conv3 = StdConv(nmid, nout, 1, dtype=dtype, rngs=rngs)
    self.conv_proj = nnx.data(None)
    if cin != nout or strides != 1:
      self.conv_proj = StdConv(cin, nout, 1, strides=strides, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.nn.relu(self.gn1(x))
    residual = x if self.conv_proj is None else self.conv_proj(y)
    y = self.conv1(y)
    y = self.conv2(jax.nn.relu(self.gn2(y)))
    y = self.conv3(jax.nn.relu(self.gn3(y)))
    return y + residual


class Stage(nnx.Module):
  """Units unit01, unit02, ... at one resolution (the first strides)."""

  def __init__(
    self, count: int, cin: int, nmid: int, *, strides: int, dtype: jnp.dtype, rngs: nnx.Rngs
  ):
    self.names = tuple(f"unit{i + 1:02d}" for i in range(count))
    for i, name in enumerate(self.names):
      unit = Unit(cin, nmid, strides=strides if i == 0 else 1, dtype=dtype, rngs=rngs)
      setattr(self, name, unit)
      cin = 4 * nmid

  def __call__(self, x: jax.Array) -> jax.Array:
    for name in self.names:
      x = getattr(self, name)(x)
    return x


class RootBlock(nnx.Module):
  """The 7x7 stride-2 weight-standardised convolution (pooled after, by the encoder)."""

  def __init__(self, cin: int, width: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.conv_root = StdConv(cin, width, 7, strides=2, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv_root(x)


class BiTEncoder(nnx.Module):
  """big_vision's BiT ResNet-V2 without its head: x [B, H, W, 1] -> 5 feature maps."""

  def __init__(self, name: str, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    depth, multiplier = parse(name)
    width = 64 * multiplier
    self.root_block = RootBlock(3, width, dtype=dtype, rngs=rngs)
    cin = width
    for i, count in enumerate(DEPTHS[depth]):
      nmid = width * 2**i
      stage = Stage(count, cin, nmid, strides=2 if i else 1, dtype=dtype, rngs=rngs)
      setattr(self, f"block{i + 1}", stage)
      cin = 4 * nmid
    self.norm_pre_head = GroupNorm(cin, dtype=dtype)
    self.channels = (width, *(4 * width * 2**i for i in range(4)))

  def __call__(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
    del train  # GroupNorm: the same in training and evaluation
    x = self.root_block(x)
    features = [x]
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage in (self.block1, self.block2, self.block3):
      x = stage(x)
      features.append(x)
    features.append(jax.nn.relu(self.norm_pre_head(self.block4(x))))
    return features

  def head_input(self, deepest: jax.Array) -> jax.Array:
    """What BiT's head pools: ReLU(norm_pre_head(block4)), the deepest feature already."""
    return deepest


def bit_encoder(name: str):
  """The registry's builder for `config.model.encoder=name` (grey or RGB input alike)."""
  parse(name)

  def build(*, in_features: int, dtype: jnp.dtype, rngs: nnx.Rngs) -> BiTEncoder:
    del in_features  # the root convolution sums its RGB kernel for grey images
    return BiTEncoder(name, dtype=dtype, rngs=rngs)

  return build
