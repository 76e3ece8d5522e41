"""Procedural chest X-ray phantoms with lung masks (numpy only, deterministic from a seed).

A phantom is a frontal radiograph as a person sees it: dark air around a bright body, two
dark lung fields of varied shape and size (air is dark), a brighter mediastinum and heart
shadow cutting into the left lung, the spine, ribs crossing the lungs, domed diaphragms
below them, smooth texture and noise, at a varied resolution, aspect ratio and contrast.
The lung mask is anatomical: both lung fields, without the heart and mediastinum.
`abnormal` phantoms carry one to three round opacities, or a patch of consolidation,
inside a lung; they brighten the lung there but leave its mask unchanged.

Coordinates: `u` runs from -1 (image left, the patient's right) to 1, `v` from 0 (top) to 1.
Each example draws from its own generator `default_rng([seed, index])`, so example i is
the same whatever the dataset size.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cxr_jax.data.records import Example

SYNTHETIC_SEED = 0
MIN_SIDE, MAX_SIDE = 160, 384
MASKLESS_FRACTION = 0.15  # examples stored without a mask (has_mask False)
ABNORMAL_FRACTION = 0.5


@dataclasses.dataclass(frozen=True)
class Phantom:
  """One synthetic radiograph.

  image: [H, W] uint8. lungs: [H, W] uint8 in {0, 1}, the true lung fields (also for
  examples with has_mask False, whose stored mask is all zero). opacity: [H, W] float32,
  the brightening added by lesions (all zero for normal examples).
  """

  image: np.ndarray
  lungs: np.ndarray
  opacity: np.ndarray
  has_mask: bool
  label: int  # 0 normal, 1 abnormal


def make_phantom(seed: int, index: int, sides: tuple[int, int] = (MIN_SIDE, MAX_SIDE)) -> Phantom:
  """Generates example `index` of the phantom set `seed`, its sides within `sides`."""
  rng = np.random.default_rng([seed, index])
  height, width = _draw_size(rng, *sides)
  has_mask = bool(rng.random() >= MASKLESS_FRACTION)
  label = int(rng.random() < ABNORMAL_FRACTION)
  v, u = np.meshgrid(
    (np.arange(height, dtype=np.float32) + 0.5) / height,
    (np.arange(width, dtype=np.float32) + 0.5) / width * 2 - 1,
    indexing="ij",
  )
  pixel = 1.0 / min(height, width)  # one pixel in normalised units (roughly)

  # ----- anatomy (hard regions) -----
  u0 = rng.normal(0, 0.03)
  body_half_width = rng.uniform(0.78, 0.95) * (0.5 + 0.5 * np.sqrt(np.clip(v / 0.3, 0, 1)))
  body = (np.abs(u - u0) < body_half_width).astype(np.float32)
  heart = _ellipse(
    u,
    v,
    u0 + rng.uniform(0.1, 0.2),
    rng.uniform(0.6, 0.7),
    rng.uniform(0.24, 0.34),
    rng.uniform(0.15, 0.22),
    rng.uniform(-0.4, 0.1),
  )
  mediastinum = np.abs(u - u0) < rng.uniform(0.06, 0.11)
  lungs = np.zeros((height, width), bool)
  diaphragm = np.zeros((height, width), bool)
  for side in (-1, 1):
    lung, below = _lung(rng, u, v, u0, side)
    lungs |= lung
    diaphragm |= below
  lungs &= ~heart & ~mediastinum & (body > 0)

  # ----- intensities: hard regions first, softened together by one blur -----
  tissue = rng.uniform(0.55, 0.75)
  air = rng.uniform(0.0, 0.12)
  lung_depth = rng.uniform(0.22, 0.4) * tissue
  texture = _smooth_noise(rng, height, width, 10) * rng.uniform(0.02, 0.05)
  hilum = np.exp(-(((np.abs(u - u0) - 0.22) / 0.08) ** 2 + ((v - 0.45) / 0.12) ** 2))
  image = air + (tissue - air) * body * (0.85 + 0.15 * (1 - np.abs(u - u0) ** 2))
  image += rng.uniform(0.0, 0.06) * diaphragm + rng.uniform(0.0, 0.05) * heart
  image -= lungs * (lung_depth - texture - rng.uniform(0.03, 0.08) * hilum)
  opacity = np.zeros((height, width), np.float32)
  if label:
    opacity = _lesions(rng, u, v, lungs, lung_depth)
    image += opacity
  image = _blur(image, int(rng.integers(1, 3)))
  image += body * (_spine(rng, u, v, u0) + _ribs(rng, u, v, u0, pixel))

  # ----- acquisition: blur, contrast, gamma, noise -----
  image = _blur(image, 1)
  lo, hi = rng.uniform(-0.05, 0.05), rng.uniform(0.85, 1.05)
  image = np.clip((image - lo) / (hi - lo), 0, 1) ** rng.uniform(0.8, 1.25)
  image += rng.uniform(0.01, 0.035) * rng.standard_normal(image.shape, dtype=np.float32)
  image = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
  return Phantom(
    image=image,
    lungs=lungs.astype(np.uint8),
    opacity=opacity.astype(np.float32),
    has_mask=has_mask,
    label=label,
  )


def _draw_size(rng: np.random.Generator, low: int, high: int) -> tuple[int, int]:
  side = int(rng.integers(low, high + 1))
  if rng.random() < 0.6:
    return side, side
  other = int(np.clip(side * rng.uniform(0.8, 1.25), low, high))
  return side, other


def _ellipse(u, v, cu, cv, ru, rv, angle) -> np.ndarray:
  c, s = np.cos(angle), np.sin(angle)
  du, dv = u - cu, v - cv
  return ((c * du + s * dv) / ru) ** 2 + ((-s * du + c * dv) / rv) ** 2 <= 1


def _lung(rng, u, v, u0, side) -> tuple[np.ndarray, np.ndarray]:
  """One lung field (superellipse, narrowing to a rounded apex, cut by the diaphragm dome).

  Returns the lung and the region below its diaphragm.
  """
  cu = u0 + side * rng.uniform(0.36, 0.48)
  cv = rng.uniform(0.4, 0.48)
  ru = rng.uniform(0.25, 0.36) * (0.92 if side > 0 else 1.0)
  rv = rng.uniform(0.27, 0.36)
  power = rng.uniform(2.0, 3.2)
  tilt = side * rng.uniform(-0.05, 0.2)
  du = u - cu - tilt * (v - cv)
  top = cv - rv
  ru_at_v = ru * (0.45 + 0.55 * np.sqrt(np.clip((v - top) / (0.7 * rv), 0, 1)))
  inside = (np.abs(du) / ru_at_v) ** power + (np.abs(v - cv) / rv) ** power <= 1
  dome_base = cv + rv * rng.uniform(0.75, 0.95) + (0.0 if side > 0 else -0.02)
  dome = dome_base - rng.uniform(0.04, 0.1) * (1 - ((u - cu) / (1.15 * ru)) ** 2)
  below = (v > dome) & (np.abs(u - cu) < 1.3 * ru)
  return inside & ~below, below


def _spine(rng, u, v, u0) -> np.ndarray:
  half_width = rng.uniform(0.045, 0.075)
  period = rng.uniform(0.045, 0.07)
  band = np.clip((half_width - np.abs(u - u0)) / 0.02, 0, 1)
  vertebrae = 0.75 + 0.25 * np.cos(2 * np.pi * v / period)
  return rng.uniform(0.06, 0.16) * band * vertebrae


def _ribs(rng, u, v, u0, pixel) -> np.ndarray:
  """Posterior ribs: bands drooping laterally from the spine, roughly evenly spaced."""
  out = np.zeros(u.shape, np.float32)
  for side in (-1, 1):
    lateral = np.clip(side * (u - u0) - 0.07, 0, None)
    top = rng.uniform(0.08, 0.14)
    spacing = rng.uniform(0.06, 0.08)
    count = int(rng.integers(8, 11))
    thick = rng.uniform(0.014, 0.026)
    curve = top + rng.uniform(0.0, 0.1) * lateral + rng.uniform(0.25, 0.45) * lateral**2
    phase = (v - curve) / spacing
    k = np.floor(phase + 0.5)
    dist = np.abs(phase - k) * spacing
    edge = max(1.5 * pixel, 0.004)
    band = np.clip((thick / 2 - dist) / edge + 0.5, 0, 1)
    band *= (k >= 0) & (k < count) & (side * (u - u0) > 0.06) & (v < 0.9)
    out += rng.uniform(0.04, 0.11) * band
  return out


def _lesions(rng, u, v, lungs, lung_depth) -> np.ndarray:
  """Round opacities (1-3) or one consolidation patch, inside the lungs."""
  ys, xs = np.nonzero(lungs)
  out = np.zeros(lungs.shape, np.float32)
  if rng.random() < 0.3:  # consolidation: a large, irregular patch
    i = rng.integers(len(ys))
    radius = rng.uniform(0.1, 0.16)
    d2 = ((u - u[ys[i], xs[i]]) / radius) ** 2 + ((v - v[ys[i], xs[i]]) / radius) ** 2
    wobble = 0.3 * _smooth_noise(rng, *lungs.shape, 6)
    patch = np.clip((1 + wobble - d2) / 0.3, 0, 1)
    out += rng.uniform(0.45, 0.65) * lung_depth * patch
  else:
    for _ in range(int(rng.integers(1, 4))):
      i = rng.integers(len(ys))
      sigma = rng.uniform(0.025, 0.06)
      d2 = (u - u[ys[i], xs[i]]) ** 2 + (v - v[ys[i], xs[i]]) ** 2
      out += rng.uniform(0.5, 0.9) * lung_depth * np.exp(-d2 / (2 * sigma**2))
  return out * lungs


def _blur(x: np.ndarray, radius: int) -> np.ndarray:
  """Two passes of a (2r+1) box filter along each axis (close to a Gaussian), edge-padded."""
  x = np.asarray(x, np.float32)
  if radius <= 0:
    return x
  size = 2 * radius + 1
  for _ in range(2):
    c = np.cumsum(np.pad(x, [(radius + 1, radius), (0, 0)], mode="edge"), axis=0)
    x = (c[size:] - c[:-size]) / size
    c = np.cumsum(np.pad(x, [(0, 0), (radius + 1, radius)], mode="edge"), axis=1)
    x = (c[:, size:] - c[:, :-size]) / size
  return x


def _smooth_noise(rng, height: int, width: int, cells: int) -> np.ndarray:
  """Zero-mean noise varying over about `cells` blobs per side (bilinear upsampling)."""
  grid = rng.normal(size=(cells + 1, cells + 1)).astype(np.float32)
  y = np.linspace(0, cells, height, dtype=np.float32)
  x = np.linspace(0, cells, width, dtype=np.float32)
  y0 = np.minimum(y.astype(int), cells - 1)
  x0 = np.minimum(x.astype(int), cells - 1)
  fy, fx = (y - y0)[:, None], (x - x0)[None, :]
  g00, g01 = grid[y0][:, x0], grid[y0][:, x0 + 1]
  g10, g11 = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
  return g00 * (1 - fy) * (1 - fx) + g01 * (1 - fy) * fx + g10 * fy * (1 - fx) + g11 * fy * fx


def phantom_id(index: int) -> str:
  return f"synthetic_{index:05d}"


class PhantomReader:
  """The 'synthetic' dataset kind: `num_examples` phantoms of seed SYNTHETIC_SEED."""

  skipped: list = []  # generated: nothing to skip

  def __init__(self, manual_dir: str = "", num_examples: int = 0):
    del manual_dir  # generated
    self.num_examples = num_examples

  def describe(self) -> str:
    return f"{self.num_examples} phantoms (seed {SYNTHETIC_SEED})"

  def where(self, file: str) -> str:
    return file

  def items(self) -> list[tuple[str, int]]:
    return [(phantom_id(i), i) for i in range(self.num_examples)]

  def read(self, index: int, skip) -> Example:
    del skip  # a phantom is always usable
    phantom = make_phantom(SYNTHETIC_SEED, index)
    return Example(
      id=phantom_id(index),
      image=phantom.image,
      mask=phantom.lungs if phantom.has_mask else None,
      label=phantom.label,
      source="synthetic",
    )
