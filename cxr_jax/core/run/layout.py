"""Every path of a run directory, and of a sweep's root, in one place.

    DIR/config.json          resolved config, versions, dataset, devices (rundir.write_config)
    DIR/checkpoints/<step>/  Orbax (checkpoint.py)
    DIR/metrics.jsonl        one JSON object per logged step and split (writers.py)
    DIR/eval/<name>.json     evaluate's aggregates; .csv one row per image; _report.html
    DIR/calibration.json     the temperature evaluate fitted on validation for one checkpoint
    DIR/lung_boxes_<split>.json  a lung-crop classifier's cached lung boxes
    DIR/run.lock             held while a run trains (run_lock.py)
    DIR/profile/             jax.profiler traces (config.profile_steps)
    DIR/sweep.json, sweep.log  which sweep, variant, seed and fold made the run; its commands

Paths are `etils.epath.Path`s: a local directory or a gs:// URL, opened the same way.
"""

import fnmatch
import os

from etils import epath

from cxr_jax.data import paths


class RunDir:
  """One run directory (local or gs://): the one owner of its file names."""

  CONFIG = "config.json"
  METRICS = "metrics.jsonl"
  CALIBRATION = "calibration.json"
  LOCK = "run.lock"
  SWEEP_RECORD = "sweep.json"
  TRACKER = "tracker.json"

  def __init__(self, workdir: "str | os.PathLike | RunDir"):
    self.root = workdir.root if isinstance(workdir, RunDir) else paths.resolve(workdir)
    self.path = epath.Path(self.root)

  def __str__(self) -> str:
    return self.root

  def __repr__(self) -> str:
    return f"RunDir({self.root!r})"

  @property
  def config(self) -> epath.Path:
    return self.path / self.CONFIG

  @property
  def checkpoints(self) -> epath.Path:
    return self.path / "checkpoints"

  def checkpoint(self, step: int) -> epath.Path:
    return self.checkpoints / str(step)

  @property
  def metrics(self) -> epath.Path:
    return self.path / self.METRICS

  @property
  def calibration(self) -> epath.Path:
    return self.path / self.CALIBRATION

  @property
  def lock(self) -> epath.Path:
    return self.path / self.LOCK

  @property
  def tracker(self) -> epath.Path:
    """The experiment tracker's run this run writes to (core/run/trackers.py)."""
    return self.path / self.TRACKER

  @property
  def profile(self) -> epath.Path:
    return self.path / "profile"

  @property
  def sweep_record(self) -> epath.Path:
    return self.path / self.SWEEP_RECORD

  @property
  def sweep_log(self) -> epath.Path:
    return self.path / "sweep.log"

  @property
  def eval_dir(self) -> epath.Path:
    return self.path / "eval"

  def eval_summary(self, name: str) -> epath.Path:
    """evaluate's aggregates of `name` (a split, e.g. 'test', or 'test.tta_on')."""
    return self.eval_dir / f"{name}.json"

  def eval_table(self, name: str) -> epath.Path:
    """evaluate's one row per image of `name`."""
    return self.eval_dir / f"{name}.csv"

  def lung_boxes(self, split: str) -> epath.Path:
    return self.path / f"lung_boxes_{split}.json"

  def checkpoint_steps(self) -> list[int]:
    """The steps of the checkpoint folders present (complete or not), ascending."""
    if not self.checkpoints.is_dir():
      return []
    return sorted(int(p.name) for p in self.checkpoints.iterdir() if p.name.isdigit())


def run_dirs(pattern: str) -> list[RunDir]:
  """The run directories a command-line argument names: a directory, or a glob pattern
  (`gs://bucket/sweep/*/*`, expanded here because a shell does not expand URLs), keeping
  the directories that hold a config.json."""
  if not any(c in pattern for c in "*?["):
    return [RunDir(pattern)]
  root = paths.resolve(pattern)
  scheme, sep, rest = root.partition("://")
  prefix, parts = (f"{scheme}://", rest.split("/")) if sep else ("", root.split("/"))
  first = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
  matches = [epath.Path(prefix + "/".join(parts[:first]))]
  for part in parts[first:]:  # iterdir, not glob: epath's glob drops a bucket's scheme
    matches = [
      child
      for match in matches
      if match.is_dir()
      for child in sorted(match.iterdir(), key=lambda p: p.name)
      if fnmatch.fnmatchcase(child.name, part)
    ]
  return [RunDir(str(m)) for m in matches if (m / RunDir.CONFIG).exists()]
