"""Sweeps: a base config, named variants, seeds and folds, expanded into runs.

A sweep file (`configs/sweeps/NAME.py`) defines `get_sweep()` returning a `Sweep`:

    Sweep(config="configs/unet.py", variants={"unet": {}, "attention": {"model.name": ...}},
          seeds=(0, 1), folds=5, overrides={"data.name": "kaggle"}, baseline="unet")

`folds=N` runs every variant and seed on each of N folds (`config.data.split='kfold'`), 0
keeps the config's own protocol. Each run gets ROOT/<variant>/seed<s>[_fold<f>] (a local
folder or a gs:// URL), trained by `python -m cxr_jax.main` and scored on `split` by
`python -m cxr_jax.evaluate`.
"""

import dataclasses
import itertools
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from cxr_jax import errors
from cxr_jax.core.run import rundir
from cxr_jax.core.run.layout import RunDir
from cxr_jax.data import paths
from cxr_jax.data import stress


@dataclasses.dataclass(frozen=True)
class Sweep:
  config: str  # a config file, optionally with its ':arg'
  variants: Mapping[str, Mapping[str, Any]]  # name -> config overrides ('model.name': ...)
  seeds: Sequence[int] = (0,)
  folds: int = 0
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # every run
  split: str = "test"  # scored by evaluate
  checkpoint: str = "best"
  baseline: str = ""  # the variant others are compared with ('' : the first)
  stress: Sequence[str] = ()  # evaluate --stress=KIND of every run too (data/stress.py)


@dataclasses.dataclass(frozen=True)
class Run:
  variant: str
  seed: int
  fold: int | None
  overrides: Mapping[str, Any]  # everything set on the command line, in order

  @property
  def name(self) -> str:
    return f"{self.variant}/seed{self.seed}" + ("" if self.fold is None else f"_fold{self.fold}")


def product(**axes: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """Variants crossing named axes: product(model={'unet': {...}, 'att': {...}},
  aug={'none': {...}, 'default': {}}) -> {'model=unet,aug=none': {...}, ...}."""
  variants = {}
  for choice in itertools.product(*(list(values.items()) for values in axes.values())):
    name = ",".join(f"{axis}={value}" for axis, (value, _) in zip(axes, choice))
    merged: dict[str, Any] = {}
    for _, overrides in choice:
      merged.update(overrides)
    variants[name] = merged
  return variants


def zipped(names: Sequence[str], **keys: Sequence[Any]) -> dict[str, dict[str, Any]]:
  """Variants changing several keys together: zipped(['small', 'big'],
  **{'data.image_size': [128, 256], 'model.base_features': [8, 16]})."""
  if any(len(values) != len(names) for values in keys.values()):
    raise ValueError(f"zipped: every key needs {len(names)} values, one per variant name.")
  return {name: {key: values[i] for key, values in keys.items()} for i, name in enumerate(names)}


def check_variant_name(name: str) -> None:
  """A variant names one folder under --root: no separators, no '..', nothing hidden."""
  if not name or name.startswith(".") or any(c in name for c in "/\\\0\n"):
    raise errors.ConfigError(
      f"sweep variant name {name!r} is not a plain folder name (it must not be empty, start "
      "with '.', or hold '/', '\\' or a newline): its run would land outside ROOT/<variant>/; "
      "rename it in the sweep file."
    )


def expand(sweep: Sweep) -> list[Run]:
  """Every (variant, seed, fold) of the sweep, in a fixed order."""
  if not sweep.variants:
    raise errors.ConfigError("a sweep needs at least one variant")
  for variant in sweep.variants:
    check_variant_name(variant)
  stress.check_kinds(sweep.stress)  # found now, not by evaluate after each run's training
  runs = []
  for variant, overrides in sweep.variants.items():
    for seed in sweep.seeds:
      for fold in range(sweep.folds) if sweep.folds else [None]:
        settings = {**sweep.overrides, **overrides, "seed": int(seed)}
        if fold is not None and fold == int(settings.get("data.outer_fold", -1)):
          continue  # nested: the outer fold tests every run and validates none
        if fold is not None:
          settings.update({"data.split": "kfold", "data.num_folds": sweep.folds, "data.fold": fold})
        runs.append(Run(variant, int(seed), fold, settings))
  return runs


def with_overrides(sweep: Sweep, extra: Mapping[str, Any]) -> Sweep:
  """The sweep with command-line overrides set in every run. An explicit protocol other than
  kfold (`data.split=cross_site`) replaces the sweep's folds: one run per variant and seed,
  as `sweep --override=data.split=cross_site` on a 5-fold sweep file means."""
  split = extra.get("data.split")
  folds = 0 if split is not None and split != "kfold" else sweep.folds
  return dataclasses.replace(sweep, overrides={**sweep.overrides, **extra}, folds=folds)


def baseline(sweep: Sweep) -> str:
  return sweep.baseline or next(iter(sweep.variants))


def _flag_value(value: Any) -> str:
  return str(value) if not isinstance(value, str) else value


def commands(sweep: Sweep, run: Run, workdir: RunDir) -> list[list[str]]:
  """The command lines of one run: train, the stress evaluations (`Sweep.stress`), then the
  evaluation whose output marks the run done (so a run stopped before it evaluates again)."""
  train = [sys.executable, "-m", "cxr_jax.main", f"--config={sweep.config}", f"--workdir={workdir}"]
  train += [f"--config.{key}={_flag_value(value)}" for key, value in run.overrides.items()]
  evaluate = [
    sys.executable,
    "-m",
    "cxr_jax.evaluate",
    f"--workdir={workdir}",
    f"--split={sweep.split}",
    f"--checkpoint={sweep.checkpoint}",
  ]
  stressed = [[*evaluate, f"--stress={kind}"] for kind in sweep.stress]
  return [train, *stressed, evaluate]


def run_dir(root: str, run: Run) -> RunDir:
  """ROOT/<variant>/seed<s>[_fold<f>]."""
  return RunDir(f"{paths.resolve(root)}/{run.name}")


def _last_steps(run: RunDir) -> tuple[int | None, int | None]:
  """(config.num_train_steps, the newest checkpoint's step) of a run directory."""
  steps = run.checkpoint_steps()
  if not (run.config.exists() and steps):
    return None, None
  last_step = int(rundir.read_record(str(run.config))["config"]["num_train_steps"])
  return last_step, steps[-1]


def is_trained(run: RunDir) -> bool:
  """Trained to its last step (not stopped early)."""
  last_step, newest = _last_steps(run)
  return last_step is not None and newest == last_step


def is_done(run: RunDir, split: str) -> bool:
  """Trained to its last step, and evaluated on `split` when that step was the newest
  checkpoint (evaluate records it: `trained_steps`)."""
  summary = run.eval_summary(split)
  if not (is_trained(run) and summary.exists()):
    return False
  last_step, _ = _last_steps(run)
  return json.loads(summary.read_text()).get("trained_steps") == last_step


def write_run_record(run_dir: RunDir, sweep_file: str, run: Run) -> None:
  run_dir.path.mkdir(parents=True, exist_ok=True)
  record = {
    "sweep": sweep_file,
    "variant": run.variant,
    "seed": run.seed,
    "fold": run.fold,
    "overrides": dict(run.overrides),
  }
  paths.write_text(str(run_dir.sweep_record), json.dumps(record, indent=2))
