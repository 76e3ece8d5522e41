"""The cardiothoracic ratio from masks (numpy): widest heart width over widest thorax width,
a measurement radiologists use (> 0.5 on a PA film suggests an enlarged heart)."""

import numpy as np


def widest(mask: np.ndarray) -> int:
  """The widest horizontal extent of a mask in pixels: over rows, last - first + 1 of the
  row's foreground (0 for an empty mask)."""
  rows = np.flatnonzero(np.asarray(mask).any(axis=1))
  if not rows.size:
    return 0
  cols = np.asarray(mask)[rows]
  first = cols.argmax(axis=1)
  last = cols.shape[1] - 1 - cols[:, ::-1].argmax(axis=1)
  return int((last - first + 1).max())


def thorax_width(lungs: np.ndarray) -> int:
  """The widest extent across both lungs: per row, from the leftmost to the rightmost lung
  pixel (the inner thoracic diameter the cardiothoracic ratio divides by)."""
  return widest(lungs)


def cardiothoracic_ratio(heart: np.ndarray, lungs: np.ndarray) -> float:
  """Widest heart width / widest thorax (lungs) width, from masks [H, W]; NaN when either
  is empty."""
  thorax = thorax_width(lungs)
  heart_width = widest(heart)
  return heart_width / thorax if thorax and heart_width else float("nan")


def prediction_columns(
  lungs: np.ndarray | None, structures: dict[str, np.ndarray]
) -> dict[str, str]:
  """predict's CSV columns of one image's native masks: `<structure>_fraction` (of the image's
  pixels) per structure and `cardiothoracic_ratio` (blank when heart or lungs are empty)."""
  row = {f"{name}_fraction": f"{mask.mean():.6f}" for name, mask in structures.items()}
  if lungs is not None and "heart" in structures:
    ratio = cardiothoracic_ratio(structures["heart"], lungs)
    row["cardiothoracic_ratio"] = f"{ratio:.4f}" if np.isfinite(ratio) else ""
  return row
