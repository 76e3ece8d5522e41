"""A run's programs compiled ahead of time for a TPU topology this machine does not have, and
what each chip would need: memory against its HBM, FLOPs per step, a roofline estimate.

libtpu (PyPI, the version jax[tpu] pins) compiles for TPUs on any Linux x86 machine:
`jax.experimental.topologies.get_topology_desc` gives compile-only devices of a named slice,
and the run's mesh over them compiles the real steps (`programs.build`), as on the slice.
Nothing here runs a step: the times are the compiler's cost model and a roofline, upper
bounds on speed, not measurements.
"""

import dataclasses
import fnmatch
import math
import os
import re
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import jax
import ml_collections
from jax.experimental import topologies

from cxr_jax import errors
from cxr_jax.core.run import sharding
from cxr_jax.core.run import utilisation
from cxr_jax.data import input_pipeline
from cxr_jax.workflows import programs

GIB = 2**30


def libtpu_problem() -> str | None:
  """None when libtpu is installed in the version jax[tpu] pins for this jax, else what to do
  (one line)."""
  wanted = next(
    (r.split(";")[0] for r in metadata.requires("jax") or [] if r.startswith("libtpu")), "libtpu"
  )
  fix = f'pip install -e ".[tpu]" or pip install "{wanted}" (what jax[tpu] {jax.__version__} pins)'
  try:
    have = metadata.version("libtpu")
  except metadata.PackageNotFoundError:
    return f"compiling for TPUs needs libtpu, which is not installed: {fix}."
  pinned = re.fullmatch(r"libtpu==(\S+)", wanted.replace(" ", ""))
  if pinned and not fnmatch.fnmatch(have, pinned.group(1)):
    return f"libtpu {have} is installed, but jax {jax.__version__} wants {wanted}: {fix}."
  return None


@dataclasses.dataclass(frozen=True)
class Kind:
  """A TPU generation as slices name it: 'v5p-8' counts TensorCores (2 per megacore chip)."""

  topology_prefix: str  # jax's topology name: '<prefix>:2x2x1'
  accelerator_prefix: str  # $TPU_ACCELERATOR_TYPE: '<prefix><cores>'
  cores_per_chip: int
  dims: int  # 2: a 2-D torus of chips (v5e, v6e); 3: 3-D
  host_chips: int  # chips of the largest one-host slice


KINDS = {
  "v4": Kind("v4", "v4-", 2, 3, 4),
  "v5e": Kind("v5e", "v5litepod-", 1, 2, 8),
  "v5p": Kind("v5p", "v5p-", 2, 3, 4),
  "v6e": Kind("v6e", "v6e-", 1, 2, 8),
}
# A slice name's chip count -> its shape (the ones Cloud TPU offers up to 256 chips).
SHAPES = {
  2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
  3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"},
}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice of compile-only devices."""

  name: str  # jax's topology name, e.g. 'v5e:2x4'
  kind: str  # a key of KINDS
  devices: tuple[jax.Device, ...]

  @property
  def chips(self) -> int:
    return len(self.devices)

  @property
  def hosts(self) -> int:
    return len({d.process_index for d in self.devices})

  @property
  def chip(self) -> utilisation.Chip:
    return utilisation.chip(self.kind)

  def describe(self) -> str:
    cores = self.chips * KINDS[self.kind].cores_per_chip
    return (
      f"{self.name} ({self.kind}-{cores}, {self.devices[0].device_kind}: {self.chips} chips, "
      f"{self.hosts} host{'s' if self.hosts > 1 else ''})"
    )


def parse_topology(text: str) -> tuple[str, str, tuple[int, ...]]:
  """'v5e:2x4' (jax's name) or 'v5e-8' (the slice's) -> ('v5e', 'v5e:2x4', (2, 4))."""
  match = re.fullmatch(r"(v\d+[a-z]*)(?::(\d+(?:x\d+)*)|-(\d+))", text.strip().lower())
  kind = KINDS.get(match.group(1)) if match else None
  if kind is None:
    raise errors.ConfigError(
      f"--topology={text!r}: expected KIND:SHAPE or KIND-CORES with KIND one of "
      f"{sorted(KINDS)}, e.g. --topology=v5e:2x2, v5e-8, v5p:2x2x1, v4-32."
    )
  name = match.group(1)
  if match.group(3):
    cores = int(match.group(3))
    shape = SHAPES[kind.dims].get(cores // kind.cores_per_chip)
    if shape is None or cores % kind.cores_per_chip:
      valid = [f"{name}-{c * kind.cores_per_chip}" for c in SHAPES[kind.dims]]
      raise errors.ConfigError(f"--topology={text!r}: not a slice this knows; valid: {valid}.")
  else:
    shape = match.group(2)
  dims = tuple(int(x) for x in shape.split("x"))
  if len(dims) != kind.dims:
    example = "x".join(["2"] * kind.dims)
    raise errors.ConfigError(
      f"--topology={text!r}: {name} slices have {kind.dims} dimensions, e.g. {name}:{example}."
    )
  return name, f"{kind.topology_prefix}:{shape}", dims


def get_topology(text: str) -> Topology:
  """The compile-only devices of a TPU slice ('v5e:2x2', 'v5e-8', 'v4-32'); a one-line error
  without libtpu or for a slice that does not exist."""
  name, topology_name, dims = parse_topology(text)
  problem = libtpu_problem()
  if problem:
    raise errors.UserError(problem)
  kind = KINDS[name]
  chips = math.prod(dims)
  # Without these libtpu asks the cloud's metadata server what it runs on, and logs errors.
  os.environ.setdefault(
    "TPU_ACCELERATOR_TYPE", f"{kind.accelerator_prefix}{chips * kind.cores_per_chip}"
  )
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # Compile-only devices use no chip: other compiles (another aot, the tests) may run beside.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  options = {}
  if chips <= kind.host_chips:  # one host holds it all (libtpu assumes 4-chip hosts)
    options["chips_per_host_bounds"] = (*dims, 1)[:3]
  if kind.cores_per_chip == 2:
    options["chip_config_name"] = "megacore"  # one device per chip, as on a real slice
  try:
    found = topologies.get_topology_desc(topology_name=topology_name, platform="tpu", **options)
  except Exception as error:  # noqa: BLE001  (libtpu's errors are RuntimeErrors of XLA)
    raise errors.ConfigError(
      f"--topology={text!r}: libtpu has no such slice ({str(error)[:200]})."
    ) from None
  return Topology(topology_name, name, tuple(found.devices))


@dataclasses.dataclass(frozen=True)
class Compiled:
  """One program compiled for one chip of the slice (XLA's memory and cost analyses)."""

  name: str  # 'train', 'eval', 'predict'
  argument_bytes: int
  output_bytes: int
  alias_bytes: int  # outputs written over donated arguments (the train state)
  temp_bytes: int
  code_bytes: int
  flops: float | None  # one call, one chip
  bytes_accessed: float | None  # HBM traffic of one call, one chip (XLA's count)
  seconds: float  # to compile, here
  executable: Any = dataclasses.field(default=None, repr=False, compare=False)  # jax's Compiled

  @property
  def total_bytes(self) -> int:
    """What the chip holds at the peak: arguments, outputs not aliased, temporaries, code."""
    return (
      self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes
    )


class DoesNotFit(Exception):
  """The compiler's own verdict: the program needs more HBM than a chip has."""

  def __init__(self, name: str, message: str):
    super().__init__(message)
    self.name = name
    used = re.search(r"Used ([\d.]+)([KMGT])? of ([\d.]+)([KMGT])? hbm", message)
    units = {None: 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    self.used_bytes = float(used.group(1)) * units[used.group(2)] if used else None
    self.hbm_bytes = float(used.group(3)) * units[used.group(4)] if used else None


def compile_program(name: str, jitted, *args) -> Compiled:
  """Lowers and compiles `jitted(*args)` (abstract, placed arguments); DoesNotFit when the
  TPU compiler finds the chip's HBM too small."""
  start = time.perf_counter()
  try:
    compiled = jitted.lower(*args).compile()
  except Exception as error:  # noqa: BLE001  (XlaRuntimeError: RESOURCE_EXHAUSTED)
    if "RESOURCE_EXHAUSTED" in str(error) or "Ran out of memory" in str(error):
      raise DoesNotFit(name, str(error)) from None
    raise
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
  return Compiled(
    name=name,
    argument_bytes=int(memory.argument_size_in_bytes),
    output_bytes=int(memory.output_size_in_bytes),
    alias_bytes=int(memory.alias_size_in_bytes),
    temp_bytes=int(memory.temp_size_in_bytes),
    code_bytes=int(memory.generated_code_size_in_bytes),
    flops=utilisation.step_flops(compiled),
    bytes_accessed=float(cost["bytes accessed"]) if cost.get("bytes accessed") else None,
    seconds=time.perf_counter() - start,
    executable=compiled,
  )


def run_mesh(config: ml_collections.ConfigDict, topology: Topology) -> jax.sharding.Mesh:
  """The run's mesh (config.mesh) over the slice, with train's checks of sizes against it."""
  mesh = sharding.create_mesh(config.get("mesh"), devices=list(topology.devices))
  data = int(mesh.shape[sharding.DATA_AXIS])
  for key in ("batch_size", "eval_batch_size"):
    input_pipeline.check_batch_size(
      config[key], num_devices=data, process_count=topology.hosts, name=key
    )
  sharding.check_image_size(config.data.image_size, mesh)
  return mesh


def compile_train(config: ml_collections.ConfigDict, topology: Topology) -> Compiled:
  """The train step of `config` over `topology`, compiled."""
  mesh = run_mesh(config, topology)
  built = programs.build(config, mesh)
  batch = programs.abstract_batch(config, mesh, config.batch_size)
  return compile_program("train", built.train_step, built.abstract_state, batch)


def compile_all(
  config: ml_collections.ConfigDict, topology: Topology
) -> list[Compiled | DoesNotFit]:
  """The train, eval and predict steps of `config` over `topology`, each compiled or the
  compiler's verdict that it does not fit."""
  mesh = run_mesh(config, topology)
  built = programs.build(config, mesh)
  train_batch = programs.abstract_batch(config, mesh, config.batch_size)
  eval_batch = programs.abstract_batch(config, mesh, config.eval_batch_size)
  predict_step, variables = programs.build_predict(config, mesh)
  todo = [
    ("train", built.train_step, built.abstract_state, train_batch),
    ("eval", built.eval_step, built.abstract_state, eval_batch),
    ("predict", predict_step, variables, eval_batch["image"]),
  ]
  results = []
  for name, jitted, *args in todo:
    try:
      results.append(compile_program(name, jitted, *args))
    except DoesNotFit as verdict:
      results.append(verdict)
  return results


@dataclasses.dataclass(frozen=True)
class Roofline:
  """A step's time bounded below by the chip's peak FLOP/s and HBM bandwidth."""

  compute_s: float
  memory_s: float

  @property
  def step_s(self) -> float:
    return max(self.compute_s, self.memory_s)

  @property
  def mfu(self) -> float:
    """The fraction of the peak the step could reach at best (memory-bound steps less)."""
    return self.compute_s / self.step_s if self.step_s else 0.0


def roofline(program: Compiled, chip: utilisation.Chip) -> Roofline | None:
  if not program.flops or not chip.hbm_gbps:
    return None
  return Roofline(
    program.flops / chip.peak_flops, (program.bytes_accessed or 0) / (chip.hbm_gbps * 1e9)
  )


# ----- search: the largest side or batch that fits, the smallest space -----


def train_fits(
  config: ml_collections.ConfigDict, topology: Topology, say: Callable[[str], None]
) -> bool:
  """Whether the train step of `config` fits a chip's HBM (compiled); says the try."""
  label = (
    f"image_size {config.data.image_size}, batch_size {config.batch_size}, "
    f"space {config.mesh.space}"
  )
  try:
    program = compile_train(config, topology)
  except DoesNotFit as verdict:
    used = f"{verdict.used_bytes / GIB:.1f} GiB" if verdict.used_bytes else "more than its HBM"
    say(f"  try {label}: does not fit (the compiler: {used} per chip)")
    return False
  hbm = topology.chip.hbm_gib
  verdict = program.total_bytes <= hbm * GIB
  say(
    f"  try {label}: {program.total_bytes / GIB:.2f} GiB per chip of {hbm:g}: "
    f"{'fits' if verdict else 'does not fit'} (compiled in {program.seconds:.0f} s)"
  )
  return verdict


def largest(first: int, fits: Callable[[int], bool], limit: int) -> tuple[int, int | None]:
  """(largest k <= limit with fits(k) or 0, smallest k seen failing or None), for a `fits`
  that holds up to some k: doubling from `first`, then bisection until the gap is under an
  eighth of k (each try is a compile of minutes)."""
  good, bad = 0, None
  k = max(1, min(first, limit))
  while True:
    if not fits(k):
      bad = k
      break
    good = k
    if k >= limit:
      return good, None
    k = min(2 * k, limit)
  while bad - good > max(1, good // 8):
    middle = (good + bad) // 2
    if fits(middle):
      good = middle
    else:
      bad = middle
  return good, bad


def search(
  config: ml_collections.ConfigDict,
  topology: Topology,
  what: str,
  say: Callable[[str], None],
) -> str:
  """--search=image_size|batch_size|space: the largest side or batch whose train step fits,
  or the smallest `space` that fits config.data.image_size; one line."""
  config = ml_collections.ConfigDict(config.to_dict())  # tries change sizes in a copy

  def attempt(**changes) -> bool:
    for key, value in changes.items():
      node, _, leaf = key.rpartition(".")
      (config[node] if node else config)[leaf] = value
    return train_fits(config, topology, say)

  mesh = run_mesh(config, topology)
  space = sharding.space_size(mesh)
  if what == "image_size":
    unit = 2 ** int(config.model.depth) * space
    good, bad = largest(
      config.data.image_size // unit,
      lambda k: attempt(**{"data.image_size": k * unit}),
      16384 // unit,
    )
    return _verdict(
      "image side", good * unit, bad and bad * unit, f"space {space}, batch {config.batch_size}"
    )
  if what == "batch_size":
    unit = math.lcm(int(mesh.shape[sharding.DATA_AXIS]), topology.hosts)
    good, bad = largest(
      config.batch_size // unit, lambda k: attempt(batch_size=k * unit), 65536 // unit
    )
    return _verdict(
      "batch", good * unit, bad and bad * unit, f"{config.data.image_size} px, space {space}"
    )
  if what == "space":
    per_host = topology.chips // topology.hosts
    side = int(config.data.image_size)
    choices = [s for s in range(1, per_host + 1) if per_host % s == 0 and side % s == 0]
    choices = [s for s in choices if config.batch_size % (topology.chips // s) == 0]
    low, high = 0, len(choices)  # the answer's index in choices; len: none fits
    while low < high:
      middle = (low + high) // 2
      if attempt(**{"mesh.space": choices[middle], "mesh.data": -1}):
        high = middle
      else:
        low = middle + 1
    if low == len(choices):
      return f"no space in {choices} fits {side} px at batch {config.batch_size}."
    return f"smallest space that fits {side} px at batch {config.batch_size}: {choices[low]}."
  raise errors.ConfigError(f"--search={what!r}; valid: 'image_size', 'batch_size', 'space'.")


def _verdict(what: str, good: int, bad: int | None, given: str) -> str:
  if not good:
    return f"no {what} fits ({given}); {bad} does not."
  above = f"; {bad} does not" if bad else " (the largest tried)"
  return f"largest {what} that fits ({given}): {good}{above}."
