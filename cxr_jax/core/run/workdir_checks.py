"""What training checks about its --workdir before writing into it: that it is given, that it
is a run (or new, or empty), that the run's step is within the config's steps, and that
metrics logged by a run whose checkpoints are gone are set aside, not mixed with new ones."""

import json
import logging
import time

from cxr_jax import errors
from cxr_jax.core.run.layout import RunDir


def _run_file_names(run: RunDir) -> set[str]:
  """What a run directory (or one a sweep prepared for a run) holds; one of them makes a
  folder a run's (so do TensorBoard's events.out.tfevents.* files)."""
  owned = (run.config, run.checkpoints, run.metrics, run.lock, run.sweep_record, run.sweep_log)
  return {path.name for path in (*owned, run.tracker)}


def check_workdir(workdir: str) -> None:
  """Refuses an empty --workdir and an existing folder that holds files but no run (e.g. a
  symlink to /etc): training would write checkpoints among someone else's files."""
  if not workdir or not str(workdir).strip():
    raise errors.ConfigError(
      "--workdir is empty: give the folder the run's checkpoints and metrics go to "
      "(a new one, or an earlier run's to resume it)."
    )
  run = RunDir(workdir)
  if not run.path.is_dir():
    return
  names = [p.name for p in run.path.iterdir()]
  run_files = _run_file_names(run)
  if not names or any(n in run_files or n.startswith("events.out.tfevents") for n in names):
    return
  shown = ", ".join(sorted(names)[:5]) + (" ..." if len(names) > 5 else "")
  raise errors.ConfigError(
    f"--workdir={workdir} is a folder of {len(names)} other files ({shown}), not a cxr_jax "
    "run (no config.json, checkpoints/ or metrics.jsonl): give a new or empty folder."
  )


def check_steps_left(workdir: str, latest_step: int | None, num_train_steps: int) -> None:
  """Refuses to resume a run whose newest checkpoint is past config.num_train_steps (a run
  copied to another config): it would 'train' no step and rewrite config.json."""
  if latest_step is not None and latest_step > num_train_steps:
    raise errors.ConfigError(
      f"{workdir} holds a checkpoint at step {latest_step}, past config.num_train_steps="
      f"{num_train_steps}: set --config.num_train_steps={latest_step} or more to continue it, "
      "or train into a new --workdir."
    )


def set_aside_orphaned_metrics(workdir: str) -> str | None:
  """When training starts from step 0 in a directory whose metrics.jsonl holds rows (its
  checkpoints were deleted), moves that file aside so steps are not logged twice; returns
  where it went (None: nothing to move)."""
  run = RunDir(workdir)
  metrics = run.metrics
  if not metrics.exists():
    return None
  rows = [line for line in metrics.read_text().splitlines() if line.strip()]
  if not rows:
    return None
  last = None
  try:
    last = json.loads(rows[-1]).get("step")
  except (ValueError, AttributeError):
    pass
  aside = run.path / f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.orphaned.jsonl"
  metrics.rename(aside)
  logging.warning(
    "%s holds %d rows (up to step %s) but %s has no checkpoint: training starts "
    "again from step 0, and those rows are kept in %s.",
    metrics,
    len(rows),
    last,
    run.checkpoints,
    aside.name,
  )
  return str(aside)
