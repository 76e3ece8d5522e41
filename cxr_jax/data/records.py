"""What dataset readers yield, what they skip, and how ids are decoded (numpy only)."""

import dataclasses
from typing import Any

import numpy as np

from cxr_jax import errors

# Anatomical structures a dataset may outline, in the order of the `structures` feature's bits
# (bit k set where STRUCTURES[k] is): lungs (both fields; the `mask` feature), heart, clavicles.
STRUCTURES = ("lungs", "heart", "clavicles")
# The structures a model segments beside the lungs (its `structure_logits` channels).
EXTRA_STRUCTURES = STRUCTURES[1:]


class DataError(errors.UserError):
  """A dataset's files are missing or unusable; the message says where and what to do."""


@dataclasses.dataclass(frozen=True)
class Skip:
  """A file that is not used (path relative to the reader's root), and why.

  `kind` is short and fixed (the build summary counts by it), `detail` names the specifics.
  """

  file: str
  kind: str
  detail: str = ""

  def __str__(self) -> str:
    return f"{self.file}: {self.kind}" + (f" ({self.detail})" if self.detail else "")


@dataclasses.dataclass
class Example:
  """One chest X-ray as a reader yields it, before the builder encodes it."""

  id: str
  image: np.ndarray  # uint8 [H, W]
  mask: np.ndarray | None  # uint8 [H, W] in {0, 1}; None: the image has no mask
  label: int  # 0 normal, 1 abnormal
  source: str  # one of the source names its dataset kind declares
  spacing_mm: tuple[float, float] = (0.0, 0.0)  # (rows, columns); 0: unknown
  spacing_estimated: bool = False  # inferred (e.g. from a resize), not recorded
  sex: str = ""
  age: int = -1
  finding: str = ""
  image_png: bytes | None = None  # the file's bytes when they are already an 8-bit grey PNG
  patient: str = ""  # '' when the dataset names no patient (splits then go by image id)
  # Structures other than the lungs (`mask`) outlined in this image: name -> uint8 [H, W] 0/1.
  structures: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  # One `findings` code per finding its reader names (`Reader.findings`); None: none labelled.
  findings: np.ndarray | None = None


def decode_id(value: Any) -> str:
  """A record's `id` as str: bytes (TFDS Text) are UTF-8, 0-d numpy arrays are unwrapped.

  The one decoding of ids, so an id means the same string wherever it is used as a key.
  """
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)
