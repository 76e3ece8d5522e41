"""Orbax checkpoints of a run: model, optimiser, step, RNG and the grain iterator.

`DIR/checkpoints/` is one `CheckpointManager`. Each checkpoint holds four items:

  model      {'params': nnx.State, 'rest': nnx.State}  (rest: batch statistics, RNG counters)
  optimizer  the optax state
  train      {'step': int32[], 'rng': uint32[2]}
  data       the grain iterator's state (JSON), one file per process

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
run killed mid-save (even `kill -9`) leaves no checkpoint that looks good: the next start
restores the newest *complete* one. The latest `config.max_to_keep` checkpoints are kept,
plus the one with the best validation `config.best_metric`.
"""

import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers

# Metrics where lower is better; the rest are maximised.
_MINIMISED_METRICS = ("loss", "hd95", "asd", "ece")


def metric_mode(name: str) -> str:
  """'min' for losses and distances, 'max' for scores such as Dice or AUC."""
  return "min" if any(m in name for m in _MINIMISED_METRICS) else "max"


def create_manager(workdir: str, config: ml_collections.ConfigDict, *,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """The run's CheckpointManager: latest `max_to_keep` plus the best by `best_metric`."""
  best_metric = config.best_metric
  mode = metric_mode(best_metric)

  def get_metric(metrics: Mapping[str, float]) -> float:
    value = metrics.get(best_metric)
    # Undefined (NaN, e.g. AUC of a one-class split) ranks last, never best.
    if value is None or math.isnan(value):
      return math.inf if mode == "min" else -math.inf
    return float(value)

  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=config.max_to_keep),
      checkpoint_managers.BestN(get_metric_fn=get_metric, reverse=(mode == "min"), n=1,
                                keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      best_fn=get_metric, best_mode=mode, preservation_policy=policy,
      cleanup_tmp_directories=True, read_only=read_only)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def save(manager: ocp.CheckpointManager, step: int, items: Mapping[str, Any],
         data_iterator: grain.DatasetIterator | None,
         metrics: Mapping[str, float] | None = None) -> None:
  """Saves `items` (pytrees: model, optimizer, train) and the data iterator at `step`."""
  args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
  if data_iterator is not None:
    args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**args), metrics=metrics)


def restore(manager: ocp.CheckpointManager, step: int, abstract_items: Mapping[str, Any],
            data_iterator: grain.DatasetIterator | None) -> dict[str, Any]:
  """Restores the items shaped (and sharded) like `abstract_items`; the iterator in place."""
  args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()}
  if data_iterator is not None:
    args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**args))
  return {name: restored[name] for name in abstract_items}


def best_step(manager: ocp.CheckpointManager) -> int | None:
  """The step of the best checkpoint by the tracked metric (None before any evaluation)."""
  steps = [s for s in manager.all_steps() if manager.metrics(s) is not None]
  return manager.best_step() if steps else None


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run wrote to DIR/config.json."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found: is {workdir!r} the --workdir of a cxr_jax.main run?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f)["config"])


def restore_for_inference(workdir: str, which: str = "latest"
                          ) -> tuple[ml_collections.ConfigDict, nnx.Module]:
  """The config and trained model (eval mode) of a run's latest or best checkpoint."""
  # Imported here: the model registry pulls in every model, which the trainer needs anyway.
  from cxr_jax import models

  if which not in ("latest", "best"):
    raise ValueError(f"checkpoint must be 'latest' or 'best', got {which!r}")
  config = load_config(workdir)
  manager = create_manager(workdir, config, read_only=True)
  step = manager.latest_step() if which == "latest" else best_step(manager)
  if step is None:
    if which == "best" and manager.latest_step() is not None:
      raise FileNotFoundError(
          f"No evaluated checkpoint in {workdir}/checkpoints to choose the best from; "
          "use --checkpoint=latest.")
    raise FileNotFoundError(f"No complete checkpoint in {workdir}/checkpoints.")
  abstract_model = nnx.eval_shape(lambda: models.create_model(config.model, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
  # Onto this process's first device, whatever mesh the run was trained on.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          {"params": params, "rest": rest})
  restored = manager.restore(
      step, args=ocp.args.Composite(model=ocp.args.StandardRestore(abstract)))["model"]
  model = nnx.merge(graphdef, restored["params"], restored["rest"])
  model.eval()
  logging.info("Restored %s checkpoint at step %d from %s", which, step, workdir)
  return config, model
