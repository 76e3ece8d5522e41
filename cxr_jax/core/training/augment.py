"""Paired augmentation in JAX, compiled into the train step.

One random geometric transform per example (rotation, scale, shift, shear, optional
horizontal flip, AP-style horizontal magnification and elastic deformation) moves image and
mask through the *same* sampling grid: bilinear for the image, nearest for the mask, so they
stay aligned. Intensity transforms (gamma, contrast windows, contrast, brightness, CLAHE-like
local contrast, simulated opacities in the lungs, blur, noise) touch the image only: an
opacity painted into a lung leaves it lung in the mask, as consolidated lung is.

Strengths come from `config.aug`; a strength of 0 removes that transform from the traced
graph, and `config.aug.enabled=False` returns the inputs unchanged. The config is read at
trace time, so pass it by closure: `jax.jit(functools.partial(augment_batch,
aug_config=config.aug))`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from jax.scipy import ndimage


@dataclasses.dataclass(frozen=True)
class AugParams:
  """The `config.aug` fields as Python values (hashable, read once at trace time); their
  defaults and valid ranges are the config schema's (cxr_jax/config/keys.py)."""

  enabled: bool
  rotate_deg: float
  scale: float
  shift: float
  shear_deg: float
  elastic_alpha: float
  elastic_sigma: float
  hflip: bool
  brightness: float
  contrast: float
  gamma: float
  noise_std: float
  blur_sigma: float
  window: float = 0.0
  local_contrast: float = 0.0
  opacity: float = 0.0
  magnification: float = 0.0

  @classmethod
  def from_config(cls, aug_config: ml_collections.ConfigDict | AugParams) -> AugParams:
    if isinstance(aug_config, AugParams):
      return aug_config
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(aug_config.keys()) - fields
    if unknown:
      raise ValueError(f"config.aug has unknown keys {sorted(unknown)}; valid: {sorted(fields)}.")
    return cls(**{k: aug_config[k] for k in aug_config.keys()})

  @property
  def geometric(self) -> bool:
    return bool(
      self.rotate_deg
      or self.scale
      or self.shift
      or self.shear_deg
      or self.hflip
      or self.elastic_alpha
      or self.magnification
    )


def augment_batch(
  key: jax.Array,
  image: jax.Array,
  mask: jax.Array,
  aug_config: ml_collections.ConfigDict | AugParams,
  soft: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
  """Augments a batch, one independent draw per example.

  Args:
    key: PRNG key for this step (split into one key per example).
    image: [B, S, S, 1] float32, normalised.
    mask: [B, S, S, 1] float32 in {0, 1}.
    aug_config: `config.aug` (static: read while tracing).
    soft: optional [B, S, S, 1] soft mask (a teacher's p(lung)) moved with the same geometry,
      interpolated bilinearly; zero outside the image.

  Returns:
    (image, mask) with the input shapes and dtypes; mask stays in {0, 1}. With `soft`:
    (image, mask, soft). The draws do not depend on `soft`: image and mask are the same.
  """
  params = AugParams.from_config(aug_config)
  if not params.enabled:
    return (image, mask) if soft is None else (image, mask, soft)
  if image.ndim != 4 or image.shape[1] != image.shape[2] or image.shape[-1] != 1:
    raise ValueError(f"image must be [B, S, S, 1], got {image.shape}.")
  keys = jax.random.split(key, image.shape[0])
  if soft is None:
    return jax.vmap(lambda k, x, m: _augment_one(k, x, m, params)[:2])(keys, image, mask)
  return jax.vmap(lambda k, x, m, p: _augment_one(k, x, m, params, p))(keys, image, mask, soft)


def _augment_one(
  key: jax.Array,
  image: jax.Array,
  mask: jax.Array,
  params: AugParams,
  soft: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """[S, S, 1] image, mask (and soft mask) -> augmented (image, mask, soft)."""
  geom_key, elastic_key, intensity_key = jax.random.split(key, 3)
  x, m = image[..., 0], mask[..., 0]
  if params.geometric:
    coords = _affine_coords(geom_key, x.shape[0], params)
    if params.elastic_alpha:
      coords = coords + _elastic_field(elastic_key, x.shape[0], params)
    # Outside the image: the image's darkest value (like the letterbox padding), no mask.
    # (cval must be static, so shift the image to make its minimum 0 and back: exact.)
    low = x.min()
    x = ndimage.map_coordinates(x - low, list(coords), order=1, mode="constant", cval=0.0) + low
    m = ndimage.map_coordinates(m, list(coords), order=0, mode="constant", cval=0.0)
    if soft is not None:
      p = ndimage.map_coordinates(soft[..., 0], list(coords), order=1, mode="constant", cval=0.0)
      soft = p[..., None].astype(soft.dtype)
  x = _intensity(intensity_key, x, params, m)
  return x[..., None].astype(image.dtype), m[..., None].astype(mask.dtype), soft


def _uniform(key: jax.Array, low: float, high: float) -> jax.Array:
  return jax.random.uniform(key, (), minval=low, maxval=high)


def _affine_coords(key: jax.Array, size: int, params: AugParams) -> jax.Array:
  """[2, S, S] input (row, col) coordinates that each output pixel samples.

  The output is the input rotated, scaled, sheared and shifted about the centre; we build
  the inverse map directly (output -> input), which has the same distribution because every
  parameter range is symmetric.
  """
  k_rot, k_scale, k_shear, k_shift, k_flip = jax.random.split(key, 5)
  k_mag = jax.random.fold_in(key, 5)  # apart from the five: the older draws stay the same
  angle = jnp.deg2rad(_uniform(k_rot, -params.rotate_deg, params.rotate_deg))
  zoom = _uniform(k_scale, 1 - params.scale, 1 + params.scale)
  shear = jnp.deg2rad(_uniform(k_shear, -params.shear_deg, params.shear_deg))
  shift = jax.random.uniform(k_shift, (2,), minval=-params.shift, maxval=params.shift) * size
  flip = jnp.where(jax.random.bernoulli(k_flip), -1.0, 1.0) if params.hflip else 1.0
  # AP films magnify what is far from the detector: widen (never narrow) the columns.
  widen = _uniform(k_mag, 1.0, 1.0 + params.magnification) if params.magnification else 1.0
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  rotation = jnp.array([[cos, -sin], [sin, cos]])
  shearing = jnp.array([[1.0, jnp.tan(shear)], [0.0, 1.0]])
  inverse = rotation @ shearing @ jnp.diag(jnp.array([1.0, flip / widen])) / zoom
  centre = (size - 1) / 2
  grid = jnp.stack(jnp.meshgrid(jnp.arange(size), jnp.arange(size), indexing="ij"))
  grid = grid.reshape(2, -1).astype(jnp.float32) - centre
  coords = inverse @ grid + centre + shift[:, None]
  return coords.reshape(2, size, size)


def _gaussian_matrix(size: int, sigma: jax.Array | float) -> jax.Array:
  """[S, S] row-normalised Gaussian smoothing matrix: `G @ x` blurs x along its rows.

  A matmul instead of a convolution: cheap at these sizes on any accelerator, works with a
  traced (per-example) sigma, and the row normalisation handles the borders.
  """
  position = jnp.arange(size, dtype=jnp.float32)
  distance = position[:, None] - position[None, :]
  weights = jnp.exp(-0.5 * (distance / jnp.maximum(sigma, 1e-3)) ** 2)
  return weights / weights.sum(axis=1, keepdims=True)


def _smooth(image: jax.Array, sigma: jax.Array | float) -> jax.Array:
  """Separable Gaussian blur of a [S, S] array."""
  g = _gaussian_matrix(image.shape[0], sigma)
  return g @ image @ g.T


def _elastic_field(key: jax.Array, size: int, params: AugParams) -> jax.Array:
  """[2, S, S] smooth random displacement, largest |displacement| = elastic_alpha pixels."""
  noise = jax.random.normal(key, (2, size, size))
  field = jax.vmap(lambda n: _smooth(n, params.elastic_sigma))(noise)
  return field * (params.elastic_alpha / (jnp.abs(field).max() + 1e-6))


def _intensity(key: jax.Array, x: jax.Array, params: AugParams, lungs: jax.Array) -> jax.Array:
  """Gamma, window, contrast, brightness, local contrast, opacity, blur, noise on one
  normalised [S, S] image (`lungs`: its [S, S] lung mask, where opacities are painted)."""
  k_gamma, k_contrast, k_bright, k_blur, k_noise = jax.random.split(key, 5)
  # The newer transforms draw apart from the five, so a seed's older draws stay the same.
  k_window, k_local, k_opacity = (jax.random.fold_in(key, i) for i in (5, 6, 7))
  low, high = x.min(), x.max()
  span = jnp.maximum(high - low, 1e-6)
  if params.gamma:
    # Gamma needs [0, 1]: map the image's own range there and back (normalised images are
    # signed), so the transform bends the contrast curve without moving its ends.
    gamma = _uniform(k_gamma, 1 - params.gamma, 1 + params.gamma)
    x = ((x - low) / span) ** gamma * span + low
  if params.window:
    lo_key, hi_key = jax.random.split(k_window)
    lo = low + span * _uniform(lo_key, 0.0, params.window)
    hi = high - span * _uniform(hi_key, 0.0, params.window)
    x = (jnp.clip(x, lo, hi) - lo) / jnp.maximum(hi - lo, 1e-6) * span + low
  if params.contrast:
    x = x * _uniform(k_contrast, 1 - params.contrast, 1 + params.contrast)
  if params.brightness:
    x = x + _uniform(k_bright, -params.brightness, params.brightness)
  if params.local_contrast:
    background = _smooth(x, x.shape[0] / 8)
    x = x + _uniform(k_local, 0.0, params.local_contrast) * (x - background)
  if params.opacity:
    x = _paint_opacity(k_opacity, x, lungs, params.opacity)
  if params.blur_sigma:
    x = _smooth(x, _uniform(k_blur, 0.0, params.blur_sigma))
  if params.noise_std:
    x = x + params.noise_std * jax.random.normal(k_noise, x.shape)
  return x


def _paint_opacity(key: jax.Array, x: jax.Array, lungs: jax.Array, probability: float):
  """With `probability`, blends a smooth random blob inside the lungs toward the brightness
  of soft tissue (the image's 80th percentile; consolidation, effusion: lung that looks like
  tissue), never darkening a pixel.

  The blob is low-frequency noise (Gaussian-smoothed, sigma side/12) above a random level,
  weighted toward the lung bases where such opacities sit, feathered and strength-scaled."""
  k_on, k_noise, k_level, k_strength = jax.random.split(key, 4)
  size = x.shape[0]
  field = _smooth(jax.random.normal(k_noise, x.shape), size / 12)
  field = (field - field.mean()) / (field.std() + 1e-6)
  # Height within the lungs: 0 at their apices, 1 at their bases.
  rows = jnp.arange(size, dtype=jnp.float32)[:, None]
  filled = lungs.max(axis=1)[:, None] > 0
  top = jnp.min(jnp.where(filled, rows, size))
  bottom = jnp.max(jnp.where(filled, rows, 0.0))
  height = jnp.clip((rows - top) / jnp.maximum(bottom - top, 1.0), 0.0, 1.0)
  blob = jax.nn.sigmoid(4.0 * (field + 2.0 * height - _uniform(k_level, 0.5, 2.5))) * lungs
  tissue = jnp.quantile(x, 0.8)  # mediastinum and soft tissue: brighter than aerated lung
  strength = _uniform(k_strength, 0.4, 0.9) * jax.random.bernoulli(k_on, probability)
  return x + strength * blob * jnp.maximum(tissue - x, 0.0)
