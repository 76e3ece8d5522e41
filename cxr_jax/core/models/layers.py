"""Building blocks shared by the U-Nets and the classifier (Flax NNX, NHWC).

Every block takes `dtype`, the computation dtype: convolutions and matmuls run in it, while
parameters stay float32 and normalisation statistics are computed and kept in float32 (flax
promotes them). Blocks take `train` at call time: it switches BatchNorm between batch
statistics (updating the running averages) and the running averages, and turns dropout on.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cxr_jax.core.models import ops

NORMS = ("batch", "group", "none")
UPSAMPLES = ("transpose", "resize")
# float64: the reference the float32 steps are held against (tests/test_precision.py; needs
# jax_enable_x64).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def compute_dtype(name: str) -> jnp.dtype:
  """Maps `config.model.dtype` ('float32' | 'bfloat16' | 'float64') to a jnp dtype."""
  if name not in DTYPES:
    raise ValueError(f"config.model.dtype={name!r} is not supported; use one of {sorted(DTYPES)}.")
  return DTYPES[name]


def check_choice(key: str, value: str, valid: Sequence[str]) -> None:
  """Raises a ValueError naming the config key when `value` is not in `valid`."""
  if value not in valid:
    raise ValueError(f"config.model.{key}={value!r} is not supported; use one of {list(valid)}.")


def check_input(x: jax.Array, stride: int, model: str) -> None:
  """Checks x is [B, H, W, C] with H and W divisible by `stride`, saying what would fit."""
  if x.ndim != 4:
    raise ValueError(f"{model} expects images [B, H, W, C]; got shape {x.shape}.")
  height, width = x.shape[1:3]
  if height % stride or width % stride:

    def fits(n: int) -> str:
      lower, upper = (n // stride) * stride, (n // stride + 1) * stride
      return f"{lower} or {upper}" if lower else f"{upper}"

    raise ValueError(
      f"{model} downsamples by {stride}, so height and width must be multiples of {stride}; "
      f"got {height}x{width}. Use e.g. height {fits(height)} and width {fits(width)} "
      f"(config.data.image_size), or lower config.model.depth."
    )


class Norm(nnx.Module):
  """BatchNorm, GroupNorm or identity, chosen by name ('batch' | 'group' | 'none')."""

  def __init__(
    self, kind: str, features: int, *, dtype: jnp.dtype, zero_init: bool = False, rngs: nnx.Rngs
  ):
    check_choice("norm", kind, NORMS)
    self.kind = kind
    scale_init = nnx.initializers.zeros if zero_init else nnx.initializers.ones
    if kind == "batch":
      # momentum 0.9: small datasets give few steps, running averages must catch up quickly.
      self.norm = nnx.BatchNorm(
        features, momentum=0.9, dtype=dtype, scale_init=scale_init, rngs=rngs
      )
    elif kind == "group":
      # 32 groups (Wu & He 2018) where the width allows it; gcd keeps it a divisor.
      self.norm = nnx.GroupNorm(
        features, num_groups=math.gcd(32, features), dtype=dtype, scale_init=scale_init, rngs=rngs
      )
    else:
      self.norm = None

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.kind == "batch" and train:  # flax's BatchNorm, with a faster gradient
      bn = self.norm
      y, mean, var = ops.batch_norm_train(
        x.astype(jnp.float32), bn.scale[...], bn.bias[...], bn.epsilon
      )
      bn.mean[...] = jax.lax.stop_gradient(bn.momentum * bn.mean[...] + (1 - bn.momentum) * mean)
      bn.var[...] = jax.lax.stop_gradient(bn.momentum * bn.var[...] + (1 - bn.momentum) * var)
      return y.astype(bn.dtype or x.dtype)
    if self.kind == "batch":
      return self.norm(x, use_running_average=True)
    if self.kind == "group":
      return self.norm(x)
    return x


class ConvNormAct(nnx.Module):
  """3x3 (or k x k) padded convolution, normalisation, optional ReLU.

  The convolution has no bias when a normalisation follows (its shift makes it redundant).
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    norm: str,
    dtype: jnp.dtype,
    kernel_size: int = 3,
    strides: int = 1,
    act: bool = True,
    zero_init_norm: bool = False,
    rngs: nnx.Rngs,
  ):
    self.conv = nnx.Conv(
      in_features,
      out_features,
      (kernel_size, kernel_size),
      strides=strides,
      padding="SAME",
      use_bias=norm == "none",
      dtype=dtype,
      rngs=rngs,
    )
    self.norm = Norm(norm, out_features, dtype=dtype, zero_init=zero_init_norm, rngs=rngs)
    self.act = act

  def __call__(self, x: jax.Array | Sequence[jax.Array], *, train: bool) -> jax.Array:
    """x: [B, H, W, C], or the parts of one along channels (a skip and the upsampled
    features), convolved part by part with the kernel's slices and summed: the same as
    the convolution of their concatenation, without the concatenated copy."""
    conv = self.conv
    if conv.kernel_size == (3, 3) and conv.strides in (1, (1, 1)):
      parts = [x] if isinstance(x, jax.Array) else list(x)
      kernel = conv.kernel[...].astype(conv.dtype)
      y, start = None, 0
      for part in parts:
        width = part.shape[-1]
        term = ops.conv3x3(part.astype(conv.dtype), kernel[:, :, start : start + width])
        y, start = (term if y is None else y + term), start + width
      if conv.bias is not None:
        y = y + conv.bias[...].astype(conv.dtype)
    else:
      y = conv(x if isinstance(x, jax.Array) else jnp.concatenate(x, axis=-1))
    y = self.norm(y, train=train)
    return jax.nn.relu(y) if self.act else y


class Dropout(nnx.Module):
  """Dropout whose randomness comes from the 'dropout' stream held in the module.

  Holding the stream (rather than passing keys at call time) keeps the call contract
  `model(x, train=...)`; under `nnx.split`/`nnx.merge` the stream's counter is part of the
  state, so a jitted step that returns the new state draws fresh masks every step.
  """

  def __init__(self, rate: float, *, rngs: nnx.Rngs):
    self.rate = rate
    self.dropout = nnx.Dropout(rate, rngs=rngs) if rate > 0 else None

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.dropout is None:
      return x
    return self.dropout(x, deterministic=not train)


class DoubleConv(nnx.Module):
  """The U-Net level: two padded 3x3 conv -> norm -> ReLU, then dropout."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    norm: str,
    dropout: float,
    dtype: jnp.dtype,
    rngs: nnx.Rngs,
  ):
    self.conv1 = ConvNormAct(in_features, out_features, norm=norm, dtype=dtype, rngs=rngs)
    self.conv2 = ConvNormAct(out_features, out_features, norm=norm, dtype=dtype, rngs=rngs)
    self.dropout = Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array | Sequence[jax.Array], *, train: bool) -> jax.Array:
    x = self.conv2(self.conv1(x, train=train), train=train)
    return self.dropout(x, train=train)


def resize_2x(x: jax.Array) -> jax.Array:
  """Bilinear 2x upsampling of [B, H, W, C] (half-pixel centres, like align_corners=False)."""
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, 2 * h, 2 * w, c), method="bilinear")


class TransposeConv2x2(nnx.Module):
  """2x2 transposed convolution with stride 2 (the U-Net "up-convolution").

  With kernel == stride the output blocks do not overlap, so it is one matmul per input
  pixel, [Cin] -> [2, 2, Cout], then a depth-to-space shuffle: out[2i+p, 2j+q] =
  x[i, j] @ kernel[p, q] + bias (PyTorch's ConvTranspose2d convention). Same parameters
  (kernel [2, 2, Cin, Cout] + bias [Cout]) as `nnx.ConvTranspose(..., (2, 2), strides=2)`,
  which computes the same with the kernel flipped spatially, but without the zero-dilated
  convolution XLA would run for it (4x the work).
  """

  def __init__(self, in_features: int, out_features: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal(in_axis=2, out_axis=3, batch_axis=(0, 1))
    self.kernel = nnx.Param(init(rngs.params(), (2, 2, in_features, out_features)))
    self.bias = nnx.Param(jnp.zeros((out_features,)))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = ops.upconv2x2(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    return y + self.bias[...].astype(self.dtype)


class Upsample(nnx.Module):
  """Doubles H and W and maps in_features -> out_features.

  'transpose': 2x2 transposed convolution, stride 2 (Ronneberger et al. 2015).
  'resize': bilinear resize, then a 3x3 convolution (no checkerboard artefacts; Odena et al.
  2016).
  """

  def __init__(
    self, in_features: int, out_features: int, *, mode: str, dtype: jnp.dtype, rngs: nnx.Rngs
  ):
    check_choice("upsample", mode, UPSAMPLES)
    self.mode = mode
    if mode == "transpose":
      self.up = TransposeConv2x2(in_features, out_features, dtype=dtype, rngs=rngs)
    else:
      self.up = nnx.Conv(in_features, out_features, (3, 3), padding="SAME", dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.mode == "resize":
      x = resize_2x(x)
    return self.up(x)


class Encoder(nnx.Module):
  """The contracting path: `depth` DoubleConv + max-pool levels, then the bottleneck.

  Level i has base_features * 2**i channels; the bottleneck has base_features * 2**depth.
  """

  def __init__(
    self,
    in_features: int,
    *,
    base_features: int,
    depth: int,
    norm: str,
    dropout: float,
    dtype: jnp.dtype,
    rngs: nnx.Rngs,
  ):
    widths = [base_features * 2**i for i in range(depth + 1)]
    self.widths = widths
    self.levels = nnx.List(
      [
        DoubleConv(cin, cout, norm=norm, dropout=dropout, dtype=dtype, rngs=rngs)
        for cin, cout in zip([in_features] + widths[:-2], widths[:-1])
      ]
    )
    self.bottleneck = DoubleConv(
      widths[-2], widths[-1], norm=norm, dropout=dropout, dtype=dtype, rngs=rngs
    )

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[list[jax.Array], jax.Array]:
    """x [B, H, W, Cin] -> (skips, finest first: [B, H/2**i, W/2**i, widths[i]], bottleneck)."""
    skips = []
    for level in self.levels:
      x = level(x, train=train)
      skips.append(x)
      x = ops.max_pool_2x2(x)
    return skips, self.bottleneck(x, train=train)


class Decoder(nnx.Module):
  """The expanding path: upsample, concatenate the (optionally gated) skip, DoubleConv."""

  def __init__(
    self,
    widths: Sequence[int],
    *,
    norm: str,
    dropout: float,
    upsample: str,
    dtype: jnp.dtype,
    rngs: nnx.Rngs,
  ):
    # Built from the coarsest level up; ups[j] / blocks[j] serve skip level depth-1-j.
    coarse_to_fine = list(reversed(widths))
    self.ups = nnx.List(
      [
        Upsample(cin, cout, mode=upsample, dtype=dtype, rngs=rngs)
        for cin, cout in zip(coarse_to_fine[:-1], coarse_to_fine[1:])
      ]
    )
    self.blocks = nnx.List(
      [
        DoubleConv(2 * cout, cout, norm=norm, dropout=dropout, dtype=dtype, rngs=rngs)
        for cout in coarse_to_fine[1:]
      ]
    )

  def __call__(
    self,
    bottleneck: jax.Array,
    skips: list[jax.Array],
    *,
    train: bool,
    gates: Sequence[nnx.Module] | None = None,
  ) -> tuple[list[jax.Array], list[jax.Array]]:
    """Returns (each level's features finest first: [0] at full resolution, [k] at 1/2**k;
    gate maps finest first, [] without gates).

    gates[i], when given, is called as `gate(skip_i, g) -> (gated skip, coefficients)`, with
    g the decoder features one level coarser than skip i (the gating signal).
    """
    x = bottleneck
    coefficients, levels = [], []
    for up, block, skip, level in zip(
      self.ups, self.blocks, reversed(skips), reversed(range(len(skips)))
    ):
      if gates is not None:
        skip, alpha = gates[level](skip, x)
        coefficients.append(alpha)
      x = block([skip, up(x)], train=train)  # = the concatenation, without copying it
      levels.append(x)
    return levels[::-1], coefficients[::-1]


def global_average_pool(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, C], averaged in float32."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
