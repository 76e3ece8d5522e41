"""The device mesh and how arrays are placed on it.

`config.mesh = {'data': -1, 'space': S}`: a 2-D mesh. Batches are split over `data`; with
S > 1 every image's height (and so every activation's, as XLA's partitioner propagates it
through the convolutions, placing the halos) is split over `space` as well, so one image
can be larger than one device's memory. Parameters and optimiser state are replicated, or,
with `config.shard_params`, split over `data` (FSDP: XLA gathers them where they are used).
Batch norm statistics stay exact: inside `jax.jit` a mean over the batch and the image is a
mean over the global arrays, whatever their partitioning.

Both axes are Auto (`jax.make_mesh` defaults to Explicit): XLA places what the step does not
pin down itself. `space` groups devices of one process, so every process still loads whole
images.
"""

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cxr_jax import errors
from cxr_jax.data import batch_size as batch_size_lib

DATA_AXIS = "data"
SPACE_AXIS = "space"


def create_mesh(
  mesh_config: Mapping[str, int] | None = None, devices: list[jax.Device] | None = None
) -> jax.sharding.Mesh:
  """The ('data', 'space') mesh of `mesh_config` ({'data': -1, 'space': 1} by default; -1:
  the devices left) over all (or the given) devices; an error naming values that work."""
  devices = jax.devices() if devices is None else list(devices)
  given = dict(mesh_config or {})
  unknown = sorted(set(given) - {DATA_AXIS, SPACE_AXIS})
  if unknown:
    raise errors.ConfigError(f"config.mesh has unknown axes {unknown}; valid: 'data', 'space'.")
  count = len(devices)
  space = int(given.get(SPACE_AXIS, 1))
  data = int(given.get(DATA_AXIS, -1))
  divisors = [d for d in range(1, count + 1) if count % d == 0]
  if space < 1 or count % space:
    raise errors.ConfigError(
      f"config.mesh.space={space} must divide the {count} devices; valid: {divisors}."
    )
  data = count // space if data == -1 else data
  if data * space != count:
    raise errors.ConfigError(
      f"config.mesh: data={data} x space={space} != {count} devices; set "
      f"--config.mesh.data=-1 (the devices left over)."
    )
  local = sum(d.process_index == devices[0].process_index for d in devices)
  if local % space:
    raise errors.ConfigError(
      f"config.mesh.space={space} must divide the {local} devices of one process, so that "
      "an image is split only within its host."
    )
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh(
    (data, space), (DATA_AXIS, SPACE_AXIS), axis_types=(auto, auto), devices=devices
  )


def space_size(mesh: jax.sharding.Mesh) -> int:
  return int(mesh.shape[SPACE_AXIS])


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`, the rest whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def image_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  """[B, H, W, C]: batch over `data`, height over `space`."""
  return NamedSharding(mesh, P(DATA_AXIS, SPACE_AXIS))


def sharding_of(value: Any, mesh: jax.sharding.Mesh) -> NamedSharding:
  """Images (rank >= 3) are split in height too; per-example values only by batch."""
  return image_sharded(mesh) if np.ndim(value) >= 3 else data_sharded(mesh)


def state_sharding(abstract_state: Any, mesh: jax.sharding.Mesh, shard_params: bool) -> Any:
  """Shardings of a TrainState: replicated, or (FSDP) each array's largest axis that divides
  by the `data` size split over it (small and indivisible arrays stay replicated)."""
  data = int(mesh.shape[DATA_AXIS])

  def place(x) -> NamedSharding:
    shape = getattr(x, "shape", ())
    if not shard_params or data == 1 or math.prod(shape) < 2**14:
      return replicated(mesh)
    axes = [i for i in np.argsort(shape)[::-1] if shape[i] % data == 0]
    if not axes:
      return replicated(mesh)
    spec = [None] * len(shape)
    spec[axes[0]] = DATA_AXIS
    return NamedSharding(mesh, P(*spec))

  return jax.tree.map(place, abstract_state)


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, name: str = "batch_size") -> int:
  """This process's rows of a global batch over `mesh`, or an error naming a value that works
  (`batch_size.check_batch_size`, with the size of the mesh's `data` axis)."""
  return batch_size_lib.check_batch_size(
    batch_size,
    num_devices=int(mesh.shape[DATA_AXIS]),
    process_count=jax.process_count(),
    name=name,
  )


def check_image_size(image_size: int, mesh: jax.sharding.Mesh) -> None:
  space = space_size(mesh)
  if image_size % space:
    fix = max(space, round(image_size / space) * space)
    raise errors.ConfigError(
      f"config.data.image_size={image_size} must divide by config.mesh.space={space} "
      f"(the image height is split over it); set --config.data.image_size={fix}."
    )


def to_global(batch: Mapping[str, Any], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Host batch (this process's slice) -> global arrays (`sharding_of`).

  Non-numeric entries (ids as strings) stay on the host and are dropped here.
  """
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.dtype.kind in "biuf":
      out[key] = jax.make_array_from_process_local_data(sharding_of(value, mesh), value)
  return out
