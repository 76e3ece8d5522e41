"""The one batch-size check: a global batch splits evenly over devices and processes.

Plain arithmetic (no grain, no TFDS): the input pipeline, sharding and predict's loader use it
without importing each other.
"""

import math

import numpy as np

from cxr_jax import errors


def check_batch_size(
  batch_size: int, *, num_devices: int, process_count: int, name: str = "batch_size"
) -> int:
  """Returns this process's rows of a global batch, or says which value of `name` to use.

  `batch_size` must be a positive multiple of the device count (every device gets equal
  rows) and of the process count (every process loads equal rows).
  """
  unit = math.lcm(num_devices, process_count)
  if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0 or batch_size % unit:
    fix = max(1, round(batch_size / unit) if isinstance(batch_size, (int, float)) else 1) * unit
    raise errors.ConfigError(
      f"config.{name}={batch_size!r} must be a positive multiple of {unit} (the device "
      f"count is {num_devices}, the process count {process_count}); set "
      f"--config.{name}={fix}."
    )
  return int(batch_size) // process_count
