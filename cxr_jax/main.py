"""Entry point: `python -m cxr_jax.main --config=configs/unet.py --workdir=DIR`.

Parses flags, sets up the (possibly multi-host) platform and hands over to
`train.train_and_evaluate`. Running the same command again resumes from DIR.
"""

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cxr_jax import cli
from cxr_jax.workflows import train

_WORKDIR = flags.DEFINE_string(
  "workdir",
  "/tmp/cxr_jax",
  "Where checkpoints, metrics and TensorBoard events go; an existing run there is resumed.",
)
_MULTIHOST = flags.DEFINE_bool(
  "multihost",
  False,
  "Call jax.distributed.initialize() (TPU pods, SLURM and other "
  "clusters it detects; else pass --coordinator_address and friends).",
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
  if _COORDINATOR.value:
    # Cross-process collectives for CPU devices (a no-op for GPU and TPU ones).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      _COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value
    )
  elif _MULTIHOST.value:
    jax.distributed.initialize()
  logging.info(
    "JAX process %d of %d; %d local and %d global devices (%s).",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.default_backend(),
  )
  train.train_and_evaluate(flags.FLAGS.config, _WORKDIR.value)


def run() -> None:
  flags.mark_flags_as_required(["config"])
  cli.run(main)


if __name__ == "__main__":
  run()
