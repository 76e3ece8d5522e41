"""Starting on a machine or a cluster: jax.distributed, device checks, the compilation cache,
and `jit`, the one way the project compiles (with the XLA options every program needs)."""

import functools
import glob
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax

from cxr_jax.core.run import multihost as multihost_lib


def detected_cluster(environ=os.environ) -> str | None:
  """The multi-process launcher this process runs under ('slurm', 'mpi', 'tpu'), or None.

  Single-process jobs (one task, one TPU host) count as no cluster.
  """

  def count(name: str) -> int:
    value = environ.get(name, "")
    return int(value) if value.isdigit() else 0

  if "SLURM_JOB_ID" in environ and max(count("SLURM_NTASKS"), count("SLURM_STEP_NUM_TASKS")) > 1:
    return "slurm"
  if count("OMPI_COMM_WORLD_SIZE") > 1 or count("PMI_SIZE") > 1:
    return "mpi"
  if len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return "tpu"
  return None


def local_accelerators() -> int:
  """GPUs or TPU chips this host has (device files), whatever JAX makes of them."""
  gpus = [p for p in glob.glob("/dev/nvidia*") if re.fullmatch(r"/dev/nvidia\d+", p)]
  tpus = [p for p in glob.glob("/dev/accel*") if re.fullmatch(r"/dev/accel\d+", p)]
  return len(gpus) or len(tpus)


def _count(value: str | None) -> int | None:
  return int(value) if value and value.isdigit() else None


def _slurm_tasks_on_this_node(environ) -> int | None:
  """Tasks of this job step on this node: SLURM_NTASKS_PER_NODE when the job asked for it,
  else this node's entry of SLURM_STEP_TASKS_PER_NODE (e.g. '8(x2),4': 8, 8, then 4)."""
  if (count := _count(environ.get("SLURM_NTASKS_PER_NODE"))) is not None:
    return count
  layout = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", "")
  per_node = []
  for part in filter(None, layout.split(",")):
    match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
    if not match:
      return None
    per_node += [int(match[1])] * int(match[2] or 1)
  node = _count(environ.get("SLURM_NODEID")) or 0
  return per_node[node] if node < len(per_node) else None


def _slurm_local_device_ids(environ=os.environ) -> list[int] | None:
  """The GPU ordinals this SLURM task should use, as this process numbers them.

  JAX's SLURM detection asks for GPU [SLURM_LOCALID] (jax-ml/jax#23452), which exists only
  when the task sees every GPU of its node. CUDA numbers the GPUs a process sees from 0,
  whatever CUDA_VISIBLE_DEVICES names (physical ids '3', or '0' after cgroup renumbering):
  - a task given its own GPUs (`--gpus-per-task`): all it sees, 0..k-1;
  - a task that sees all of its node's GPUs beside other tasks: its share of them, by
    SLURM_LOCALID;
  - the node's only task: all of the node's GPUs.
  None: nothing to say (no GPU count known); JAX's default then applies.
  """
  tasks = _slurm_tasks_on_this_node(environ) or 1
  local_id = _count(environ.get("SLURM_LOCALID")) or 0
  on_node = _count(environ.get("SLURM_GPUS_ON_NODE"))
  visible = environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    # Ids or UUIDs; older SLURM writes 'NoDevFiles' for a task without GPUs.
    seen = len([d for d in visible.split(",") if re.fullmatch(r"\d+|(GPU|MIG)-\S+", d.strip())])
    if seen == 0:
      return None  # no GPU for this task: a CPU task
    if tasks > 1 and seen == (on_node or seen) and seen >= tasks and seen % tasks == 0:
      share = seen // tasks  # every task sees the whole node: split it
      return list(range(local_id * share, (local_id + 1) * share))
    return list(range(seen))
  on_node = on_node if on_node is not None else local_accelerators()
  if not on_node:
    return None
  share = max(on_node // tasks, 1)
  return list(range(local_id * share, (local_id + 1) * share))


def initialize_kwargs(
  environ: Mapping[str, str],
  *,
  coordinator_address: str | None,
  num_processes: int | None,
  process_id: int | None,
  multihost: bool,
  init_timeout_s: int,
) -> dict[str, Any] | None:
  """The keyword arguments `start` passes to jax.distributed.initialize in `environ` (the
  flags' values beside it), or None for a single-process job. JAX detects what is not given
  (coordinator, process count and id) from the cluster's environment."""
  cluster = detected_cluster(environ)
  if not (coordinator_address or multihost or cluster):
    return None
  if coordinator_address:
    return {
      "coordinator_address": coordinator_address,
      "num_processes": num_processes,
      "process_id": process_id,
      "initialization_timeout": init_timeout_s,
    }
  return {
    "local_device_ids": _slurm_local_device_ids(environ) if cluster == "slurm" else None,
    "initialization_timeout": init_timeout_s,
  }


def start(
  *,
  coordinator_address: str | None,
  num_processes: int | None,
  process_id: int | None,
  multihost: bool,
  init_timeout_s: int,
) -> str:
  """Starts jax.distributed where the job has several processes; returns how it started."""
  kwargs = initialize_kwargs(
    os.environ,
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    multihost=multihost,
    init_timeout_s=init_timeout_s,
  )
  if kwargs is None:
    return "single process"
  # Cross-process collectives for CPU devices (a no-op for GPU and TPU ones).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info(
    "jax.distributed: waiting up to %d s for every process to join (--init_timeout_s).",
    init_timeout_s,
  )
  # XLA aborts the interpreter (a C++ stack) when the processes do not meet in time; a
  # watchdog a little earlier says in one line who is missing instead.
  cluster = detected_cluster()
  where = coordinator_address or f"the {cluster or 'cluster'}'s coordinator"
  if process_id:
    missing = (
      f"process {process_id} could not reach {where}: is process 0 running, and is that its "
      "host:port?"
    )
  else:
    others = f"{num_processes - 1} other process(es)" if num_processes else "the other processes"
    missing = (
      f"{others} did not join {where}: start all of them with the same --coordinator_address "
      "and --num_processes"
    )
  watchdog = threading.Timer(
    init_timeout_s, _give_up, (f"{missing} (waited --init_timeout_s={init_timeout_s} s)",)
  )
  watchdog.daemon = True
  watchdog.start()
  t0 = time.monotonic()
  try:
    jax.distributed.initialize(**{**kwargs, "initialization_timeout": init_timeout_s + _GRACE_S})
  finally:
    watchdog.cancel()
  logging.info(
    "jax.distributed: %d processes joined in %.1f s.", jax.process_count(), time.monotonic() - t0
  )
  multihost_lib.announce_host()
  if coordinator_address:
    return f"coordinator {coordinator_address}"
  devices = kwargs["local_device_ids"]
  return f"detected {cluster or 'cluster'}" + (
    f", local device ids {devices}" if devices is not None else ""
  )


_GRACE_S = 10  # XLA's own timeout comes this much after the watchdog's


def _give_up(message: str) -> None:
  """Ends the process with `message` as one line on stderr (exit status 1)."""
  sys.stdout.flush()
  sys.stderr.write(f"jax.distributed: {message}\n")
  sys.stderr.flush()
  os._exit(1)


def describe_devices(how: str) -> str:
  local = jax.local_devices()
  kinds = sorted({d.device_kind for d in local})
  return (
    f"JAX process {jax.process_index()} of {jax.process_count()} ({how}); "
    f"{len(local)} local device(s) ({', '.join(kinds)}, {jax.default_backend()}), "
    f"{jax.device_count()} in all."
  )


def check_devices(expected: int | None) -> None:
  """Refuses a device count other than `expected`; warns when JAX sees fewer accelerators
  than the host has (e.g. one GPU per SLURM node, or no CUDA build of jaxlib)."""
  if expected and jax.device_count() != expected:
    raise RuntimeError(
      f"--expect_devices={expected}, but JAX sees {jax.device_count()} devices "
      f"({jax.process_count()} processes x {jax.local_device_count()} local, "
      f"{jax.default_backend()}). Check the launcher (one task per GPU, or all GPUs per task) "
      "and that jax has the accelerator's build (e.g. jax[cuda12], jax[tpu])."
    )
  have = local_accelerators()
  visible = os.environ.get("CUDA_VISIBLE_DEVICES") or os.environ.get("TPU_VISIBLE_CHIPS")
  if visible is not None:  # a launcher gave this process some of the host's devices
    have = len([d for d in visible.split(",") if d.strip()])
  if have > jax.local_device_count() or (have and jax.default_backend() == "cpu"):
    logging.warning(
      "This host has %d accelerators but JAX uses %d local %s device(s): training on fewer "
      "than you have. Launch one process per GPU, or give each process all of them.",
      have,
      jax.local_device_count(),
      jax.default_backend(),
    )


def use_compilation_cache(directory: str) -> str:
  """Turns on JAX's persistent compilation cache in `directory` ('' : off), unless
  $JAX_COMPILATION_CACHE_DIR already chose one; returns where it is."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  if not directory:
    return ""
  directory = os.path.expanduser(directory)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return directory


# XLA:CPU hands matmuls, reductions and convolutions (here: those of 32+ channels) to
# YNNPACK by default. Its convolutions
# - lose float32 precision on CPUs with avx512_bf16 (they seem to compute in bfloat16 there):
#   a U-Net's gradients 2e-2 off a float64 reference, against 5e-5 without them (README,
#   "Numerics"; tests/test_precision.py fails if a step slips back to them);
# - ran 1.2-5x slower than XLA's own (Eigen) on this project's U-Net layers (batch 8: the
#   kernel gradient at 64 px x 64 channels 80 vs 16 ms; README, Benchmarks).
# Its matmuls and reductions are accurate and faster: keep YNNPACK for those two.
CPU_OPTIONS = {
  "xla_cpu_experimental_ynn_fusion_type": (
    "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
  )
}


@functools.cache
def compiler_options(target: str | None = None) -> dict[str, str]:
  """The `compiler_options` of the train, eval and inference jits compiled for the `target`
  platform ('cpu', 'tpu', 'gpu'; default: JAX's default backend): CPU_OPTIONS for a CPU whose
  XLA knows them (an XLA that does not is warned about once and compiles with its defaults),
  nothing for accelerators, also when the default backend is the CPU (`cxr_jax.aot`)."""
  if (target or jax.default_backend()) != "cpu":
    return {}
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(1.0).compile()
  except Exception as error:  # an XLA that renamed or dropped the option
    logging.warning("XLA:CPU options %s not taken (%s): XLA's defaults.", CPU_OPTIONS, error)
    return {}
  return dict(CPU_OPTIONS)


def jit(fun: Callable, *, target: str | None = None, **jit_kwargs) -> Callable:
  """`jax.jit(fun, **jit_kwargs)` compiled with `compiler_options(target)`: the only jit in
  cxr_jax (tests/test_precision.py checks), so no program gets XLA:CPU's imprecise defaults.
  `target`: the platform of the devices it is compiled for, where that is not the default
  backend's (`cxr_jax.aot` compiles for TPUs on a CPU)."""
  return jax.jit(fun, compiler_options=compiler_options(target), **jit_kwargs)
