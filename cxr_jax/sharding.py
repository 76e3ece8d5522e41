"""The device mesh and how arrays are placed on it.

One mesh axis, `data`: batches are split over it, parameters and optimiser state are
replicated. `jax.make_mesh` gives Explicit axis types by default; Auto lets XLA's partitioner
place everything the step does not pin down itself.
"""

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def create_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh over all (or the given) devices, with a `data` axis."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh(
      (len(devices),), (DATA_AXIS,),
      axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`, the rest whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh | None = None,
                     name: str = "batch_size", *, num_devices: int | None = None,
                     process_count: int | None = None) -> int:
  """Returns this process's rows of a global batch, or says which value of `name` to use.

  The one batch-size check (the loaders call it too): `batch_size` must be a positive
  multiple of the device count (every device gets equal rows) and of the process count
  (every process loads equal rows).

  Args:
    batch_size: the global batch size, config.<name>.
    mesh: its device count is the one checked; None: `num_devices`, else jax.device_count().
    name: the config key, for the message ('batch_size' or 'eval_batch_size').
    num_devices, process_count: override the counts (tests, or a loader told its process).
  """
  if num_devices is None:
    num_devices = mesh.devices.size if mesh is not None else jax.device_count()
  if process_count is None:
    process_count = jax.process_count()
  unit = math.lcm(num_devices, process_count)
  if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0 or batch_size % unit:
    fix = max(1, round(batch_size / unit) if isinstance(batch_size, (int, float)) else 1) * unit
    raise ValueError(
        f"config.{name}={batch_size!r} must be a positive multiple of {unit} (the device "
        f"count is {num_devices}, the process count {process_count}); set "
        f"--config.{name}={fix}.")
  return int(batch_size) // process_count


def to_global(batch: Mapping[str, Any], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Host batch (this process's slice) -> global arrays sharded over `data`.

  Non-numeric entries (ids as strings) stay on the host and are dropped here.
  """
  sharding = data_sharded(mesh)
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.dtype.kind in "biuf":
      out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out
