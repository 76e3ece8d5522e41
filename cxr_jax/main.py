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


def define_flags() -> None:
  """The command's flags; defined only when run as a command, so importing is side-free."""
  flags.DEFINE_string(
    "workdir",
    None,
    "Where checkpoints, metrics and TensorBoard events go (required: a new or empty folder, "
    "or an earlier run's to resume it).",
  )
  flags.DEFINE_bool(
    "multihost",
    False,
    "Call jax.distributed.initialize() even where no cluster is detected (SLURM, MPI and TPU "
    "pod slices are detected and started without it).",
  )
  # 15 minutes: on a cold pod slice or a fresh SLURM allocation hosts start minutes apart
  # (image pulls, driver and libtpu start-up, a venv on a network file system), and big jobs
  # report JAX's 300 s too short; a host that never comes is still an error, not a hang.
  flags.DEFINE_integer(
    "init_timeout_s", 900, "Seconds to wait for every process to join (a dead host is an error)."
  )
  flags.DEFINE_integer(
    "expect_devices", None, "Refuse to start unless JAX sees this many devices in all."
  )
  flags.DEFINE_string(
    "compilation_cache_dir",
    "~/.cache/cxr_jax/jax_cache",
    "JAX's persistent compilation cache: reruns, resumes and sweeps skip compiles ('' : off).",
  )
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
  flags.DEFINE_integer("num_processes", None, "Processes in the job.")
  flags.DEFINE_integer("process_id", None, "This process's index.")
  config_flags.DEFINE_config_file(
    "config",
    None,
    "Training config, e.g. configs/unet.py or configs/unet.py:smoke.",
    lock_config=True,
  )
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  args = flags.FLAGS
  cache = platform.use_compilation_cache(args.compilation_cache_dir)
  how = platform.start(
    coordinator_address=args.coordinator_address,
    num_processes=args.num_processes,
    process_id=args.process_id,
    multihost=args.multihost,
    init_timeout_s=args.init_timeout_s,
  )
  logging.info(platform.describe_devices(how) + (f" Compilation cache: {cache}." if cache else ""))
  platform.check_devices(args.expect_devices)
  train.train_and_evaluate(args.config, args.workdir)


def run() -> None:
  """The command: flags defined, then `main` under `cli.run`."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
