"""Orbax checkpoints of a run: model, optimiser, step, RNG and the grain iterator.

`DIR/checkpoints/` is one `CheckpointManager`; each checkpoint holds the items
`model` {'params', 'rest'} ('rest': the other model variables, batch statistics and RNG
counters), `ema` (the same, averaged; with config.optim.ema_decay), `optimizer`, `train` {'step', 'rng'} and `data` (the grain iterator's state, one
file per process). Orbax renames a checkpoint into place when it is complete, so a run
killed mid-save restores the newest complete one. The latest `config.max_to_keep` are kept,
plus the best by `config.best_metric`.
"""

import logging
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers

from cxr_jax.core.run import restore_errors
from cxr_jax.core.run.layout import RunDir
from cxr_jax.core.stats import metric_table


def metric_mode(name: str) -> str:
  """'min' for losses and distances, 'max' for scores such as Dice or AUC."""
  return "min" if metric_table.lower_is_better(name) else "max"


def create_manager(
  workdir: str, config: ml_collections.ConfigDict, *, read_only: bool = False
) -> ocp.CheckpointManager:
  """The run's CheckpointManager: latest `max_to_keep` plus the best by `best_metric`."""
  best_metric = config.best_metric
  mode = metric_mode(best_metric)

  def get_metric(metrics: Mapping[str, float]) -> float:
    value = metrics.get(best_metric)
    # Undefined (NaN, e.g. AUC of a one-class split) ranks last, never best.
    if value is None or math.isnan(value):
      return math.inf if mode == "min" else -math.inf
    return float(value)

  policy = checkpoint_managers.AnyPreservationPolicy(
    [
      checkpoint_managers.LatestN(n=config.max_to_keep),
      checkpoint_managers.BestN(
        get_metric_fn=get_metric,
        reverse=(mode == "min"),
        n=1,
        keep_checkpoints_without_metrics=False,
      ),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    best_fn=get_metric,
    best_mode=mode,
    preservation_policy=policy,
    cleanup_tmp_directories=True,
    read_only=read_only,
  )
  return ocp.CheckpointManager(RunDir(workdir).checkpoints, options=options)


def save(
  manager: ocp.CheckpointManager,
  step: int,
  items: Mapping[str, Any],
  data_iterator: grain.DatasetIterator | None,
  metrics: Mapping[str, float] | None = None,
) -> None:
  """Saves `items` (pytrees: model, optimizer, train) and the data iterator at `step`."""
  args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
  if data_iterator is not None:
    args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**args), metrics=metrics)


def restore(
  manager: ocp.CheckpointManager,
  step: int,
  abstract_items: Mapping[str, Any],
  data_iterator: grain.DatasetIterator | None,
) -> dict[str, Any]:
  """Restores the items shaped (and sharded) like `abstract_items`; the iterator in place.

  Arrays are read whatever process count saved them (Orbax reshards). The iterator's state
  is one file per process: saved by another process count, each process's iterator is moved
  instead to the batch a run of this many processes reads after `step` steps (one batch per
  step), and the log says so.
  """
  args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()}
  saved_by = saved_process_count(manager, step)
  carried = data_iterator is not None and saved_by == jax.process_count()
  if carried:
    args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**args))
  if data_iterator is not None and not carried:
    _move_iterator(data_iterator, step, saved_by)
  return {name: restored[name] for name in abstract_items}


def saved_process_count(manager: ocp.CheckpointManager, step: int) -> int | None:
  """How many processes saved checkpoint `step`'s data iterator (grain writes
  data/process_<i>-of-<n>.json per process); None when it holds no iterator."""
  data = manager.directory / str(step) / "data"  # an epath.Path: local or gs://
  names = [path.name for path in data.iterdir()] if data.is_dir() else []
  counts = {int(m[1]) for n in names if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", n))}
  return counts.pop() if len(counts) == 1 else None


def _move_iterator(data_iterator: grain.DatasetIterator, step: int, saved_by: int | None) -> None:
  count = jax.process_count()
  try:
    grain.experimental.set_next_index(data_iterator, step)
    where = (
      f"at its batch {step}, where a {count}-process run is after {step} steps (the same "
      "epoch, this run's split of the examples)"
    )
  except NotImplementedError:  # grain worker processes (config.data.num_workers > 0)
    where = (
      "at its first batch: grain cannot move an iterator read by worker processes "
      f"(--config.data.num_workers=0 resumes at batch {step})"
    )
  saved = (
    f"saved by {saved_by} process{'es' if saved_by > 1 else ''}"
    if saved_by
    else "saved without a data iterator"
  )
  logging.warning(
    "Data: checkpoint %d was %s, this run has %d: grain's iterator state is per process, so "
    "each process's iterator restarts %s.",
    step,
    saved,
    count,
    where,
  )


def restore_newest_readable(
  manager: ocp.CheckpointManager,
  steps: list[int],
  restore_fn: Callable[[int], Any],
  *,
  abstract_items: Mapping[str, Any] | None = None,
  data_state: Mapping[str, Any] | None = None,
  changed: list[str] | None = None,
) -> tuple[int, Any]:
  """(step, restore_fn(step)) for the first of `steps` that reads back (`restore_errors`).

  A damaged checkpoint (a truncated array file, cut metadata) is named and the next one is
  tried. A mismatch (what the command builds, `abstract_items` and the data iterator's
  `data_state`, differs from what the checkpoints hold; every one of them shares it) stops at
  once with `restore_errors.CheckpointMismatch`, naming the key, both sides and the `changed`
  settings. A checkpoint that vanished while
  it was read (a live run rotated it away) sends us to the newest one there is now.
  """
  damaged: list[str] = []
  queue, tried = list(steps), set()
  while queue:
    step = queue.pop(0)
    tried.add(step)
    path = restore_errors.step_path(manager.directory, step)
    try:
      difference = abstract_items and restore_errors.precheck(path, abstract_items, data_state)
      if difference:
        raise restore_errors.mismatch(difference, path, abstract_items, changed or [])
      return step, restore_fn(step)
    except restore_errors.CheckpointMismatch:
      raise
    except Exception as e:  # noqa: BLE001  (TensorStore, JSON and Orbax errors alike)
      kind = restore_errors.classify(e, path)
      if kind == "mismatch":
        raise restore_errors.mismatch(e, path, abstract_items, changed or []) from e
      if kind == "gone":
        if len(steps) == 1:
          raise FileNotFoundError(
            f"Checkpoint {path} was removed while it was read (a live run keeps only its "
            "newest max_to_keep); choose another step."
          ) from e
        manager.reload()
        queue = [s for s in sorted(manager.all_steps(), reverse=True) if s not in tried]
        logging.warning(
          "Checkpoint %s was removed while it was read (a live run keeps only its newest "
          "max_to_keep); reading step %s instead.",
          path,
          queue[0] if queue else None,
        )
        continue
      damaged.append(f"{path} ({restore_errors.one_line(e)})")
      if queue:
        logging.error(
          "Checkpoint %s cannot be read, a file in it is damaged (%s); trying the next older one.",
          path,
          restore_errors.one_line(e),
        )
  if not damaged:
    raise FileNotFoundError(f"No complete checkpoint in {manager.directory}.")
  raise restore_errors.CheckpointsUnreadable(
    f"No checkpoint in {manager.directory} can be read: {'; '.join(damaged)}."
  )


def restore_model(
  manager: ocp.CheckpointManager,
  step: int,
  params: nnx.State,
  model_state: nnx.State,
  sharding: jax.sharding.Sharding,
  item: str = "model",
) -> tuple[nnx.State, nnx.State]:
  """Only the model variables of checkpoint `step` ('model', or 'ema': their moving
  average), shaped like the abstract `params` and `model_state`, placed with `sharding` (e.g.
  one device, for inference)."""
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
    {"params": params, "rest": model_state},
  )
  restored = manager.restore(
    step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)})
  )[item]
  return restored["params"], restored["rest"]
