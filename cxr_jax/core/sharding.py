"""The device mesh and how arrays are placed on it.

One mesh axis, `data`: batches are split over it, parameters and optimiser state are
replicated. `jax.make_mesh` gives Explicit axis types by default; Auto lets XLA's partitioner
place everything the step does not pin down itself.
"""

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cxr_jax.data import input_pipeline

DATA_AXIS = "data"


def create_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh over all (or the given) devices, with a `data` axis."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh(
    (len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
  )


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`, the rest whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, name: str = "batch_size") -> int:
  """This process's rows of a global batch over `mesh`, or an error naming a value that works
  (`input_pipeline.check_batch_size`, with the mesh's device count)."""
  return input_pipeline.check_batch_size(
    batch_size, num_devices=mesh.devices.size, process_count=jax.process_count(), name=name
  )


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
