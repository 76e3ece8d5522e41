"""Experiment trackers beside TensorBoard: MLflow and Weights & Biases, by `config.tracker`.

    config.tracker          '' (off) | 'mlflow' | 'wandb'
    config.tracker_project  MLflow experiment / W&B project name
    config.tracker_uri      MLflow tracking URI ('' : $MLFLOW_TRACKING_URI or MLflow's own
                            default); W&B reads $WANDB_MODE (e.g. 'offline'), $WANDB_DIR...

A tracker is one more `writers.MetricWriter` of process 0: params at the start, the train and
validation scalars at every report, evaluate's outputs as files. The run it writes to is
named in DIR/tracker.json, so a resumed run (and evaluate afterwards) continues that run.
Both packages are an optional extra (`pip install -e ".[trackers]"`), imported only when
chosen: MLflow's import alone takes seconds.
"""

import importlib
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from etils import epath

from cxr_jax.core.run import writers
from cxr_jax.core.run.layout import RunDir
from cxr_jax.data import paths

_INSTALL = 'pip install -e ".[trackers]" (or pip install {package})'


def _import(package: str):
  try:
    return importlib.import_module(package)  # optional, slow to import: only when chosen
  except ImportError:
    raise ImportError(
      f"config.tracker={package!r} needs the {package} package: {_INSTALL.format(package=package)}."
    ) from None


def check_config(config: ml_collections.ConfigDict) -> None:
  """Fails at start-up when `config.tracker` is not installed (its value: the schema's check)."""
  if name := config.tracker:
    _import(name)


def _read_record(workdir: str) -> dict[str, Any]:
  path = RunDir(workdir).tracker
  return json.loads(path.read_text()) if path.exists() else {}


def _write_record(workdir: str, record: dict[str, Any]) -> None:
  paths.write_text(str(RunDir(workdir).tracker), json.dumps(record, indent=2))


def _flat_params(hparams: Mapping[str, Any]) -> dict[str, str]:
  return {k: str(v) for k, v in writers._flatten(hparams).items()}


class MLflowWriter(writers.MetricWriter):
  """Scalars as MLflow metrics (key 'validation/dice', the step), the config as params."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    mlflow = _import("mlflow")
    self._entities = importlib.import_module("mlflow.entities")
    record = _read_record(workdir).get("mlflow", {})
    self.client = mlflow.MlflowClient(tracking_uri=config.tracker_uri or None)
    if record.get("run_id"):
      self.run_id = record["run_id"]
      self.client.update_run(self.run_id, status="RUNNING")
    else:
      project = config.tracker_project
      experiment = self.client.get_experiment_by_name(project)
      experiment_id = (
        experiment.experiment_id if experiment else self.client.create_experiment(project)
      )
      name = epath.Path(workdir).name
      self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
      record = {
        "run_id": self.run_id,
        "experiment": project,
        "tracking_uri": self.client.tracking_uri,
      }
      _write_record(workdir, {**_read_record(workdir), "mlflow": record})

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    now = int(time.time() * 1000)
    metrics = [
      self._entities.Metric(k, writers._to_float(v), now, int(step)) for k, v in scalars.items()
    ]
    self.client.log_batch(self.run_id, metrics=metrics)

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    del step, images  # images go to TensorBoard

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    params = [self._entities.Param(k, v[:6000]) for k, v in _flat_params(hparams).items()]
    for start in range(0, len(params), 100):  # MLflow takes 100 params per call
      self.client.log_batch(self.run_id, params=params[start : start + 100])

  def log_files(self, files: Sequence[str], folder: str) -> None:
    for file in files:
      self.client.log_artifact(self.run_id, file, artifact_path=folder)

  def close(self) -> None:
    self.client.set_terminated(self.run_id)


class WandbWriter(writers.MetricWriter):
  """Scalars through `run.log(step=...)`, the config as the run's config."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    wandb = _import("wandb")
    record = _read_record(workdir).get("wandb", {})
    run_id = record.get("run_id") or uuid.uuid4().hex[:12]
    local = None if paths.is_url(workdir) else workdir  # wandb writes its files on local disk
    self.run = wandb.init(
      project=config.tracker_project,
      id=run_id,
      name=epath.Path(workdir).name,
      resume="allow",
      dir=local,
    )
    if not record:
      _write_record(workdir, {**_read_record(workdir), "wandb": {"run_id": run_id}})

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self.run.log({k: writers._to_float(v) for k, v in scalars.items()}, step=int(step))

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    del step, images  # images go to TensorBoard

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self.run.config.update(_flat_params(hparams), allow_val_change=True)

  def log_files(self, files: Sequence[str], folder: str) -> None:
    for file in files:
      self.run.save(file, base_path=str(epath.Path(file).parent.parent), policy="now")
    del folder  # wandb keeps the files' path below base_path (eval/...)

  def close(self) -> None:
    self.run.finish()


_WRITERS = {"mlflow": MLflowWriter, "wandb": WandbWriter}


def open_tracker(workdir: str, config: ml_collections.ConfigDict) -> writers.MetricWriter | None:
  """The tracker `config.tracker` names, writing to the run DIR/tracker.json names (a new
  one the first time), or None when off. Call it on process 0 only."""
  name = config.tracker
  return _WRITERS[name](workdir, config) if name else None


def log_files(workdir: str, config: ml_collections.ConfigDict, files: Sequence[str]) -> None:
  """Adds `files` (e.g. evaluate's report) to the run's tracker run, under 'eval'; nothing
  when the run has no tracker."""
  if not config.tracker or not _read_record(workdir):
    return
  tracker = open_tracker(workdir, config)
  try:
    tracker.log_files(files, "eval")
  finally:
    tracker.close()
