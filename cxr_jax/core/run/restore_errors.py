"""Why a checkpoint did not restore, and what to say about it.

Three kinds, told apart because their remedies differ:
- 'gone': the step's folder vanished while it was read (a live run keeping only its newest
  `max_to_keep` rotated it away): read the newest one again.
- 'mismatch': the files read fine but hold something else than the command builds (another
  shape, no `ema` item, the data iterator of another pipeline). Every checkpoint of the run
  shares it, and they are intact: the message names the key, what the run has and what the
  command asked, and never suggests deleting anything.
- 'damage': a file that cannot be read (truncated, cut JSON): the next older one is used.
"""

import ast
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from cxr_jax import errors

_SHAPES = re.compile(
  r"Requested shape: (\(.*?\)) is not compatible with the stored shape: (\(.*?\))"
)
_MISSING_ITEM = re.compile(
  r'Item "(\w+)" was not found in the checkpoint\. Available items: (\[.*?\])'
)
# Orbax's words for a restore target whose tree differs from what is on disk.
_STRUCTURE = ("tree structures do not match", "Missing keys", "Unexpected keys")


# Settings that change how long or how often a run does things, never what a checkpoint holds.
_NOT_IN_CHECKPOINTS = (
  "num_train_steps",
  "log_every_steps",
  "eval_every_steps",
  "checkpoint_every_steps",
  "max_to_keep",
  "num_eval_images",
  "profile_steps",
  "data.data_dir",
  "data.manual_dir",
)


class CheckpointMismatch(errors.ConfigError):
  """The run's checkpoints are intact but hold something else than the command builds."""


class CheckpointsUnreadable(errors.UserError):
  """No checkpoint of the run could be read."""


def classify(error: BaseException, step_dir: str) -> str:
  """'gone', 'mismatch' or 'damage' (module docstring) for `error` restoring `step_dir`."""
  if not epath.Path(step_dir).exists():
    return "gone"
  text = str(error)
  if isinstance(error, ValueError) and (_SHAPES.search(text) or any(s in text for s in _STRUCTURE)):
    return "mismatch"
  if isinstance(error, KeyError):
    missing = _MISSING_ITEM.search(text)
    if not missing:
      return "mismatch"  # a key of a saved state (the grain iterator's) the reader expects
    # An item no checkpoint of the run has was never saved (e.g. `ema` switched on at resume);
    # one missing beside checkpoints that have it was lost.
    return "mismatch" if _missing_everywhere(epath.Path(step_dir), missing.group(1)) else "damage"
  return "damage"


def _shape_key(stored: tuple, requested: tuple, abstract_items: Mapping[str, Any] | None) -> str:
  """The key path of the (first) array the command builds with shape `requested`."""
  if not abstract_items:
    return ""
  for item, tree in abstract_items.items():
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      if tuple(getattr(leaf, "shape", ())) == requested:
        return f"{item}/{jax.tree_util.keystr(path, simple=True, separator='/')}"
  return ""


def describe(error: BaseException, abstract_items: Mapping[str, Any] | None = None) -> str:
  """What differs, in the checkpoint's terms and the command's."""
  text = str(error)
  shapes = _SHAPES.search(text)
  if shapes:
    stored, requested = (ast.literal_eval(s) for s in shapes.groups())
    key = _shape_key(stored, requested, abstract_items)
    return (
      f"{key or 'an array'} has shape {stored} in the checkpoint, the command builds {requested}"
    )
  missing = _MISSING_ITEM.search(text)
  if missing:
    return (
      f"the command restores item {missing.group(1)!r}, the checkpoint holds {missing.group(2)}"
    )
  if isinstance(error, KeyError):
    return (
      f"the data iterator's saved state has no {error.args[0]!r} (it was saved by another "
      "data pipeline, e.g. another data.num_workers)"
    )
  return " ".join(text.split())[:300]


def _key(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _missing_everywhere(step: epath.Path, item: str) -> bool:
  """No checkpoint of the run has `item`: it was never saved (not lost from this one)."""
  return not any((p / item).exists() for p in step.parent.iterdir() if p.name.isdigit())


def precheck(
  step_dir: str,
  abstract_items: Mapping[str, Any],
  data_state: Mapping[str, Any] | None = None,
) -> str:
  """What checkpoint `step_dir` holds that differs from what the command restores, from its
  metadata alone ('' : nothing found). Reading arrays into the wrong shapes instead fails
  part-way, and the reads left behind print dozens of tracebacks."""
  step = epath.Path(step_dir)
  held = sorted(p.name for p in step.iterdir() if p.is_dir())
  for item, tree in abstract_items.items():
    if not (step / item).exists():
      if _missing_everywhere(step, item):
        return f"the command restores item {item!r}, the checkpoint holds {held}"
      continue  # lost from this checkpoint alone: damage, which the restore reports
    try:
      stored = ocp.StandardCheckpointHandler().metadata(step / item)
    except Exception:  # noqa: BLE001  (unreadable metadata: damage, which the restore reports)
      continue
    shapes = {
      _key(path): tuple(leaf.shape)
      for path, leaf in jax.tree_util.tree_leaves_with_path(stored)
      if hasattr(leaf, "shape")
    }
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      stored_shape = shapes.get(_key(path))
      if stored_shape is not None and stored_shape != tuple(leaf.shape):
        return (
          f"{item}/{_key(path)} has shape {stored_shape} in the checkpoint, the command "
          f"builds {tuple(leaf.shape)}"
        )
  if data_state is not None:
    saved_file = step / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    try:
      saved = json.loads(saved_file.read_text())
    except (OSError, ValueError):
      return ""  # no such file (another process count) or damaged: the restore reports it
    if isinstance(saved, dict) and set(saved) != set(data_state):
      return (
        f"the data iterator's saved state holds {sorted(saved)}, this command's pipeline "
        f"{sorted(data_state)} (another data.num_workers or data pipeline)"
      )
  return ""


def mismatch(
  error: BaseException | str,
  step_dir: str,
  abstract_items: Mapping[str, Any] | None,
  changed: list[str],
) -> CheckpointMismatch:
  """The one-line error for checkpoint `step_dir` not matching the command (module doc):
  `error` is the restore's error, or `precheck`'s description."""
  changed = [c for c in changed if c.split(":")[0] not in _NOT_IN_CHECKPOINTS]
  settings = (
    f"Settings that differ from the run's config.json: {'; '.join(changed[:8])} (if none of "
    "them explains it, config.json was edited after training)."
    if changed
    else "The run's config.json does not describe its checkpoints (edited after training?)."
  )
  return CheckpointMismatch(
    f"Checkpoint {step_dir} does not match what this command builds: "
    f"{error if isinstance(error, str) else describe(error, abstract_items)}. {settings} "
    "The checkpoints are intact: use the run's "
    "own settings, or a new --workdir for new ones."
  )


def config_changes(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """'key: stored -> current' for every leaf of two config dicts that differs."""

  def flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
      if isinstance(value, Mapping):
        out.update(flat(value, f"{prefix}{key}."))
      else:
        out[f"{prefix}{key}"] = value
    return out

  before, after = flat(stored), flat(current)
  return [
    f"{key}: {before.get(key, '(absent)')!r} -> {after.get(key, '(absent)')!r}"
    for key in sorted(set(before) | set(after))
    if before.get(key) != after.get(key)
  ]


def one_line(error: BaseException) -> str:
  """`Type: first line of the message` (300 characters at most)."""
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"


def step_path(directory: Any, step: int) -> str:
  """DIR/checkpoints/<step>."""
  return os.path.join(str(directory), str(step))
