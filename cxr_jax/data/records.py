"""Small helpers for reading dataset records (no jax: safe in grain workers)."""

from typing import Any

import numpy as np


def decode_id(value: Any) -> str:
  """A record's `id` as str: bytes (TFDS Text) are UTF-8, 0-d numpy arrays are unwrapped.

  The one decoding of ids in the codebase (input_pipeline, evaluate, lung_crop), so an id
  means the same string wherever it is used as a key.
  """
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)
