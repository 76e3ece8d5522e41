"""The config schema at work: defaults, filling an older run's config, validation at
start-up, and the structural keys a resume compares. The keys themselves are in keys.py."""

import math
import numbers
from typing import Any

import ml_collections

from cxr_jax import errors
from cxr_jax.config.keys import KEYS
from cxr_jax.config.keys import Key

BY_PATH: dict[str, Key] = {key.path: key for key in KEYS}

_RULE_WORDS = {"int >= 1": "an integer >= 1", "int >= 2": "an integer >= 2"}
_RULE_WORDS |= {"int >= 0": "an integer >= 0", "int": "an integer"}


# A config value is wrong (or a resume asks for another structure): the one user-error class
# of the package (cli.run prints it as one line and exits with status 2), named here too so the
# schema's callers need not import errors.
ConfigError = errors.ConfigError


def default(path: str) -> Any:
  """The default of one key, e.g. `default('qc_threshold')`."""
  return BY_PATH[path].default


def defaults() -> ml_collections.ConfigDict:
  """A config holding every key at its default: where `configs/*.py` start."""
  config = ml_collections.ConfigDict()
  for key in KEYS:
    _set(config, key.path, key.default)
  return config


def fill(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with every key it lacks (an older run's) at its default."""
  filled = ml_collections.ConfigDict(config.to_dict())
  for key in KEYS:
    if _get(filled, key.path) is _MISSING:
      _set(filled, key.path, key.default)
  return filled


def _holds(value: Any, key: Key) -> bool:
  rule, kind = key.rule, type(key.default)
  if isinstance(rule, tuple):
    return value in rule
  if kind in (bool, str):
    return isinstance(value, kind)
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    return False
  if rule.startswith("int"):
    return isinstance(value, numbers.Integral) and (rule == "int" or value >= int(rule[-1]))
  if rule == "> 0":
    return value > 0
  if rule == ">= 0":
    return value >= 0
  if rule == "[0, 1)":
    return 0 <= value < 1
  if rule == "[0, 1]":
    return 0 <= value <= 1
  raise ValueError(f"unknown rule {rule!r} of config.{key.path}")


def _describe(key: Key) -> str:
  if isinstance(key.rule, tuple):
    return f"one of {', '.join(map(repr, key.rule))}"
  if key.rule is None:
    return f"a {type(key.default).__name__}"
  return _RULE_WORDS.get(key.rule, key.rule)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first key whose value breaks its rule, that is missing or
  that the schema does not know, with a value that works. Run once, at start-up."""
  unknown = sorted(set(_leaf_paths(config)) - set(BY_PATH))
  if unknown:
    raise ConfigError(
      f"config.{unknown[0]} is not a config key; add it to cxr_jax/config/keys.py (its "
      "default, rule and meaning) or fix its spelling."
    )
  for key in KEYS:
    value = _get(config, key.path)
    if value is _MISSING:
      raise ConfigError(
        f"config.{key.path} is missing; start the config from configs/default.py "
        f"(or set --config.{key.path}={key.default!r})."
      )
    if not _holds(value, key):
      raise ConfigError(
        f"config.{key.path}={value!r} must be {_describe(key)} ({key.meaning}); "
        f"set e.g. --config.{key.path}={key.default!r}."
      )


def structural_changes(
  stored: ml_collections.ConfigDict, asked: ml_collections.ConfigDict
) -> list[tuple[str, Any, Any]]:
  """(key, the run's value, the asked value) of every structural key that differs
  (both filled from the defaults first)."""
  stored, asked = fill(stored), fill(asked)
  changes = []
  for key in KEYS:
    if key.structural is None:
      continue
    before, after = _get(stored, key.path), _get(asked, key.path)
    if key.structural(before) != key.structural(after):
      changes.append((key.path, before, after))
  return changes


_MISSING = object()


def _leaf_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  paths = []
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      paths += _leaf_paths(value, f"{prefix}{name}.")
    else:
      paths.append(f"{prefix}{name}")
  return paths


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
  node = config
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return _MISSING
    node = node[part]
  return node


def _set(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
  *parents, leaf = path.split(".")
  node = config
  for part in parents:
    if part not in node:
      node[part] = ml_collections.ConfigDict()
    node = node[part]
  node[leaf] = value
