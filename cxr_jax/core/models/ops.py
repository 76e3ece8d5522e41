"""Faster XLA:CPU forms of the U-Net's hot operations, equal to what they replace up to float
rounding (tests/test_models.py): a 3x3 'SAME' convolution whose kernel gradient is summed
per example where XLA's batched one is slow, and batch norm with its closed-form gradient.
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


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(
    x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def _kernel_grad_per_example(x: jax.Array, kernel: jax.Array) -> bool:
  """Whether the kernel gradient is cheaper summed over examples one by one.

  XLA:CPU's kernel-gradient convolution of a whole batch ran 2-5x slower than one example
  at a time, summed, at 32-128 px with 32 or more output channels (batch 8: 128 px x 32
  channels 92 vs 56 ms, 64 px x 64 channels 72 vs 23 ms), and faster elsewhere (16 channels
  at 128 px: 10 vs 33 ms; 256 px; 16 px). Accelerators, and batches split over several
  devices, keep XLA's own.
  """
  single_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
  return single_cpu and x.shape[0] > 1 and 32 <= x.shape[1] <= 128 and kernel.shape[-1] >= 32


@jax.custom_vjp
def same_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """3x3 'SAME' convolution, NHWC x HWIO; its kernel gradient summed per example where that
  is faster (`_kernel_grad_per_example`), equal to XLA's up to float rounding."""
  return _conv(x, kernel)


def _same_conv3x3_fwd(x, kernel):
  return _conv(x, kernel), (x, kernel)


def _same_conv3x3_bwd(residuals, dy):
  x, kernel = residuals
  dy = dy.astype(x.dtype)
  dx = jax.vjp(lambda x: _conv(x, kernel), x)[1](dy)[0]
  if not _kernel_grad_per_example(x, kernel):
    return dx, jax.vjp(lambda k: _conv(x, k), kernel)[1](dy)[0]
  dk = None
  for i in range(x.shape[0]):
    term = jax.vjp(lambda k, i=i: _conv(x[i : i + 1], k), kernel)[1](dy[i : i + 1])[0]
    dk = term if dk is None else dk + term
  return dx, dk


same_conv3x3.defvjp(_same_conv3x3_fwd, _same_conv3x3_bwd)
