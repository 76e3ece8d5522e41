"""What a run directory holds: its config.json, which checkpoint, and the run's dataset
splits. Its paths are `layout.RunDir`'s."""

import json
import logging
import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from cxr_jax import errors
from cxr_jax.config import schema
from cxr_jax.core import models
from cxr_jax.core.run import checkpoint
from cxr_jax.core.run.layout import RunDir
from cxr_jax.data import paths

_VERSIONED_PACKAGES = (
  "cxr_jax",
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax-checkpoint",
  "grain",
  "tensorflow-datasets",
  "numpy",
  "clu",
  "ml-collections",
)


# ----- config.json -----


def _git_commit() -> str:
  try:
    return subprocess.run(
      ["git", "rev-parse", "HEAD"],
      capture_output=True,
      text=True,
      cwd=os.path.dirname(__file__),
      timeout=10,
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ""


def write_config(
  workdir: str, config: ml_collections.ConfigDict, dataset_info: Mapping[str, Any]
) -> None:
  """DIR/config.json: resolved config, package versions, git commit, dataset name+version."""
  versions = {}
  for package in _VERSIONED_PACKAGES:
    try:
      versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      versions[package] = None
  record = {
    "config": config.to_dict(),
    "dataset": dict(dataset_info),
    "versions": versions,
    "python": platform.python_version(),
    "git_commit": _git_commit(),
    "devices": {
      "platform": jax.default_backend(),
      "count": jax.device_count(),
      "processes": jax.process_count(),
    },
  }
  paths.write_text(str(RunDir(workdir).config), json.dumps(record, indent=2, sort_keys=True))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run wrote to DIR/config.json, with the keys an older run lacks
  at the schema's defaults."""
  path = RunDir(workdir).config
  if not path.exists():
    raise FileNotFoundError(
      f"{path} not found: is {workdir!r} the --workdir of a cxr_jax.main run?"
    )
  return schema.fill(ml_collections.ConfigDict(read_record(str(path))["config"]))


def read_record(path: str) -> dict[str, Any]:
  """A run's config.json as a dict; `errors.ConfigError` naming the file when it is not a
  config.json that a run wrote (cut short, edited into invalid JSON)."""
  try:
    record = json.loads(epath.Path(path).read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise errors.ConfigError(
      f"{path} is not valid JSON ({' '.join(str(e).split())[:120]}): restore it from a copy, "
      "or move the run aside."
    ) from e
  if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
    raise errors.ConfigError(f"{path} has no 'config' object: it is not a run's config.json.")
  return record


def check_resumable(workdir: str, config: ml_collections.ConfigDict) -> None:
  """A resumed run must build the checkpoint and data iterator its checkpoints hold: a
  structural key (config/keys.py) changed is refused, naming the key and both values."""
  if not RunDir(workdir).config.exists():
    return
  changed = schema.structural_changes(load_config(workdir), config)
  if changed:
    raise schema.ConfigError(
      f"cannot resume {workdir}: "
      + "; ".join(
        f"config.{key} is {had!r} in the run, {asked!r} asked" for key, had, asked in changed
      )
      + " (it shapes the checkpoint or the data iterator); resume with the run's value, or "
      "train into another --workdir."
    )


# ----- paths -----


def with_space(config: ml_collections.ConfigDict, space: int) -> ml_collections.ConfigDict:
  """A copy of `config` whose inference splits each image over `space` devices (0: as is)."""
  if not space:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh = ml_collections.ConfigDict({"data": -1, "space": int(space)})
  return config


def check_path(path: str, flag: str) -> str:
  """Refuses paths a storage layer would rewrite; returns `path` resolved (`paths.resolve`).

  TensorStore (Orbax's array storage) reads a backslash as a separator: the arrays of
  `runs/x\\y` land in `runs/x/y`, outside the run directory, and the run cannot resume.
  """
  if "\\" in path:
    raise errors.ConfigError(
      f"{flag}={path!r} contains a backslash, which TensorStore (Orbax's array storage) reads "
      "as '/': checkpoints would land outside the directory. Use a name without '\\'."
    )
  return paths.resolve(path)


# ----- which checkpoint -----

CHECKPOINT_CHOICES = ("latest", "best", "best_or_latest")


def select_step(manager: ocp.CheckpointManager, which: str | int) -> int:
  """The step of checkpoint `which`: 'latest', 'best' (by config.best_metric, among the
  evaluated ones), 'best_or_latest', or a step number. Raises FileNotFoundError, saying
  what exists, when there is no such checkpoint."""
  where = manager.directory
  latest = manager.latest_step()
  if isinstance(which, (int, np.integer)):
    if which not in manager.all_steps():
      raise FileNotFoundError(
        f"No complete checkpoint at step {which} in {where}; steps: {sorted(manager.all_steps())}."
      )
    return int(which)
  if which not in CHECKPOINT_CHOICES:
    raise ValueError(f"checkpoint must be one of {CHECKPOINT_CHOICES} or a step, got {which!r}")
  if latest is None:
    raise FileNotFoundError(f"No complete checkpoint in {where}.")
  if which == "latest":
    return int(latest)
  evaluated = [s for s in manager.all_steps() if manager.metrics(s) is not None]
  if evaluated:
    return int(manager.best_step())
  if which == "best":
    raise FileNotFoundError(
      f"No evaluated checkpoint in {where} to choose the best from; use --checkpoint=latest."
    )
  return int(latest)


def restore_model(
  workdir: str, which: str | int = "latest"
) -> tuple[ml_collections.ConfigDict, nnx.Module, int]:
  """(config, trained model in eval mode, its step) of a run's checkpoint `which`.

  A named choice whose checkpoint cannot be read falls back to the newest one that can (with
  an error naming the damaged one); an explicit step does not.
  """
  config = load_config(workdir)
  manager = checkpoint.create_manager(workdir, config, read_only=True)
  step = select_step(manager, which)
  candidates = [step]
  if not isinstance(which, (int, np.integer)):
    candidates += [s for s in sorted(manager.all_steps(), reverse=True) if s != step]
  abstract_model = nnx.eval_shape(lambda: models.create_model(config.model, rngs=nnx.Rngs(0)))
  graphdef, params, model_state = nnx.split(abstract_model, nnx.Param, ...)
  item = "ema" if config.optim.ema_decay else "model"  # what inference uses
  # Onto this process's first device, whatever mesh the run was trained on.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  step, (params, model_state) = checkpoint.restore_newest_readable(
    manager,
    candidates,
    lambda step: checkpoint.restore_model(manager, step, params, model_state, device, item),
    abstract_items={item: {"params": params, "rest": model_state}},
  )
  model = nnx.merge(graphdef, params, model_state)
  model.eval()
  logging.info("Restored %s checkpoint at step %d from %s", which, step, workdir)
  return config, model, step


def restore_runs(
  runs: Sequence[str], checkpoint: str, *, space: int = 0
) -> list[tuple[ml_collections.ConfigDict, nnx.Module, int]]:
  """A fold ensemble's runs restored: each (config with `space`, model, step) at
  `checkpoint`. ConfigError for a run trained on lung crops (not supported in ensembles)."""
  restored = []
  for run in runs:
    config, model, step = restore_model(run, checkpoint)
    if config.data.crop_to_lungs:
      raise errors.ConfigError(
        f"{run} was trained on lung crops; ensembles of crop runs are not supported."
      )
    restored.append((with_space(config, space), model, step))
  return restored


def ensemble_runs(workdir: str) -> list[str]:
  """The run directories `--workdir` names: 'DIR' (one run), 'DIR1,DIR2,...' (an ensemble),
  or a folder whose subfolders are runs (a sweep's variant folder: its seeds and folds), each
  in sorted order. Raises ConfigError for a named folder that is neither a run nor holds one."""
  runs = []
  for part in (p.strip() for p in workdir.split(",")):
    if not part:
      continue
    path = epath.Path(part)
    if RunDir(part).config.exists():
      runs.append(part)
      continue
    children = (
      sorted(str(c) for c in path.iterdir() if RunDir(str(c)).config.exists())
      if path.is_dir()
      else []
    )
    if not children:
      raise errors.ConfigError(
        f"--workdir: {part} is not a run directory (no config.json) and holds none."
      )
    runs += children
  return runs
