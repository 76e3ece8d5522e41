"""Entry point: `python -m cxr_jax.main --config=configs/unet.py --workdir=DIR`.

Parses flags, sets up the (possibly multi-host) platform and hands over to
`train.train_and_evaluate`. Running the same command again resumes from DIR.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cxr_jax import cli
from cxr_jax.core.run import platform
from cxr_jax.workflows import train

_WORKDIR = flags.DEFINE_string(
  "workdir",
  None,
  "Where checkpoints, metrics and TensorBoard events go (required: a new or empty folder, "
  "or an earlier run's to resume it).",
)
_MULTIHOST = flags.DEFINE_bool(
  "multihost",
  False,
  "Call jax.distributed.initialize() even where no cluster is detected (SLURM, MPI and TPU "
  "pod slices are detected and started without it).",
)
_INIT_TIMEOUT = flags.DEFINE_integer(
  "init_timeout_s", 300, "Seconds to wait for every process to join (a dead host is an error)."
)
_EXPECT_DEVICES = flags.DEFINE_integer(
  "expect_devices", None, "Refuse to start unless JAX sees this many devices in all."
)
_CACHE = flags.DEFINE_string(
  "compilation_cache_dir",
  "~/.cache/cxr_jax/jax_cache",
  "JAX's persistent compilation cache: reruns, resumes and sweeps skip compiles ('' : off).",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
config_flags.DEFINE_config_file(
  "config",
  None,
  "Training config, e.g. configs/unet.py or configs/unet.py:smoke.",
  lock_config=True,
)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  cache = platform.use_compilation_cache(_CACHE.value)
  how = platform.start(
    coordinator_address=_COORDINATOR.value,
    num_processes=_NUM_PROCESSES.value,
    process_id=_PROCESS_ID.value,
    multihost=_MULTIHOST.value,
    init_timeout_s=_INIT_TIMEOUT.value,
  )
  logging.info(platform.describe_devices(how) + (f" Compilation cache: {cache}." if cache else ""))
  platform.check_devices(_EXPECT_DEVICES.value)
  train.train_and_evaluate(flags.FLAGS.config, _WORKDIR.value)


def run() -> None:
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)


if __name__ == "__main__":
  run()
