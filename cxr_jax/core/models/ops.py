"""Faster XLA:CPU forms of the U-Net's hot operations, equal to what they replace up to float
rounding (tests/test_models.py): batch norm with its closed-form gradient, and 2x2 max
pooling and the 2x2 up-convolution with their gradients written out.
Measured in benchmarks/models.py (README, Benchmarks).
"""

import functools
import math

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(
  x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Batch norm of float32 `x` with batch statistics over all axes but the last: (y, mean,
  var), as `nnx.BatchNorm(use_fast_variance=True)` computes them (var = E[x^2] - E[x]^2).

  Its gradient is the closed form (dy centred, minus its projection on x-hat): two sums in
  one pass and one elementwise pass, where autodiff through flax's version made XLA:CPU take
  1.5x as long (45 vs 29 ms at batch 8, 256 px, 16 channels).
  """
  return _batch_norm_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_fwd(x, scale, bias, epsilon):
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes)
  var = jnp.maximum((x * x).mean(axes) - mean * mean, 0.0)
  rstd = jax.lax.rsqrt(var + epsilon)
  return ((x - mean) * (rstd * scale) + bias, mean, var), (x, mean, rstd, scale)


def _batch_norm_bwd(epsilon, residuals, cotangents):
  del epsilon
  x, mean, rstd, scale = residuals
  dy, dmean, dvar = cotangents
  axes = tuple(range(x.ndim - 1))
  n = math.prod(x.shape[:-1])
  xhat = (x - mean) * rstd
  dbias = dy.sum(axes)
  dscale = (dy * xhat).sum(axes)
  dx = (scale * rstd) * (dy - dbias / n - xhat * (dscale / n))
  dx = dx + dmean / n + (x - mean) * (2.0 * dvar / n)  # where the statistics are used too
  return dx, dscale, dbias


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """3x3 'SAME' convolution, NHWC x HWIO."""
  return jax.lax.conv_general_dilated(
    x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def _flat_kernel(kernel: jax.Array) -> jax.Array:
  """[2, 2, Cin, Cout] -> [Cin, (p, q, Cout)]: the up-convolution as one matmul."""
  cin, cout = kernel.shape[2:]
  return kernel.transpose(2, 0, 1, 3).reshape(cin, 4 * cout)


def _upconv_fwd(x, kernel):
  b, h, w, cin = x.shape
  cout = kernel.shape[-1]
  y = x.reshape(-1, cin) @ _flat_kernel(kernel)  # [BHW, (p, q, O)]
  y = y.reshape(b, h, w, 2, 2, cout).transpose(0, 1, 3, 2, 4, 5)  # [B, H, p, W, q, O]
  return y.reshape(b, 2 * h, 2 * w, cout), (x, kernel)


@jax.custom_vjp
def upconv2x2(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """2x2 transposed convolution with stride 2, no bias: out[2i+p, 2j+q] = x[i, j] @ kernel[p, q].

  One matmul [B*H*W, Cin] x [Cin, 4*Cout], then the depth-to-space shuffle. Its gradient is
  written out (the shuffle undone once, two matmuls over [B*H*W, 4*Cout]): autodiff of the
  same einsum made XLA:CPU transpose the upsampled gradient into [4*Cout, B*H*W] for the
  kernel's matmul, 2.2x as long at 128 -> 256 px (65 vs 30 ms, batch 8, 32 -> 16 channels).
  """
  return _upconv_fwd(x, kernel)[0]


def _upconv_bwd(residuals, dy):
  x, kernel = residuals
  b, h, w, cin = x.shape
  cout = kernel.shape[-1]
  dy = dy.reshape(b, h, 2, w, 2, cout).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 4 * cout)
  dx = (dy @ _flat_kernel(kernel).T).reshape(x.shape)
  dkernel = (x.reshape(-1, cin).T @ dy).reshape(cin, 2, 2, cout).transpose(1, 2, 0, 3)
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


upconv2x2.defvjp(_upconv_fwd, _upconv_bwd)


def _windows(x: jax.Array) -> jax.Array:
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling, stride 2, on [B, H, W, C] with even H and W.

  Its gradient is autodiff's (dy shared equally by a window's tied maxima), written as one
  elementwise pass: the tie count as the sum of the window's four comparisons rather than
  the reduction autodiff emits, 1.5x faster at 256 px x 16 channels (44 vs 65 ms, batch 8).
  """
  return _windows(x).max(axis=(2, 4))


def _max_pool_fwd(x):
  return max_pool_2x2(x), x


def _max_pool_bwd(x, dy):
  windows = _windows(x)
  hit = (windows == windows.max(axis=(2, 4), keepdims=True)).astype(dy.dtype)
  ties = hit[:, :, :1, :, :1] + hit[:, :, :1, :, 1:] + hit[:, :, 1:, :, :1] + hit[:, :, 1:, :, 1:]
  return ((hit * (dy[:, :, None, :, None, :] / ties)).reshape(x.shape),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)
