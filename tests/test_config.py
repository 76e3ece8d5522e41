"""The config schema: one home for every key's default, rule, meaning and structural mark."""

import importlib
import json
import re

import ml_collections
import pytest

from configs import default
from cxr_jax.config import schema
from cxr_jax.config.keys import KEYS
from cxr_jax.core.run import rundir
from cxr_jax.core.run.layout import RunDir
from cxr_jax.workflows import sweeps
from tests.conftest import REPO_ROOT

CONFIGS = sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_file_starts_from_the_schema_and_passes_it(name):
  for variant in (None, "smoke"):
    config = importlib.import_module(f"configs.{name}").get_config(variant)
    schema.validate(config)
    assert set(_leaves(config)) == {key.path for key in KEYS}


SWEEPS = sorted(
  p.stem for p in (REPO_ROOT / "configs" / "sweeps").glob("*.py") if p.stem != "__init__"
)


@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_file_expands_into_runs_the_schema_accepts(name):
  sweep = importlib.import_module(f"configs.sweeps.{name}").get_sweep()
  file, _, arg = sweep.config.partition(":")
  module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
  runs = sweeps.expand(sweep)
  assert runs
  for run in runs:
    config = module.get_config(arg or None)
    for key, value in run.overrides.items():
      *parents, leaf = key.split(".")
      node = config
      for parent in parents:
        node = node[parent]
      node[leaf] = value
    schema.validate(config)


def test_every_key_has_a_meaning_a_default_that_passes_and_no_twin():
  assert len({key.path for key in KEYS}) == len(KEYS)
  assert all(key.meaning and "\n" not in key.meaning for key in KEYS)
  schema.validate(schema.defaults())
  assert default.get_config() == schema.defaults()


def test_the_encoder_rule_names_every_registered_encoder_and_only_those():
  from cxr_jax.core import models  # noqa: PLC0415 (the one test reaching into models)

  rule = next(key.rule for key in KEYS if key.path == "model.encoder")
  assert set(rule) == set(models.ENCODERS) | set(models.NATIVE_ENCODERS)


def test_an_older_runs_config_json_gets_the_missing_keys_at_their_defaults(tmp_path):
  old = default.get_config().to_dict()
  del old["semi"], old["qc_threshold"], old["optim"]["ema_decay"], old["data"]["num_workers"]
  old["model"]["base_features"] = 16
  (tmp_path / RunDir.CONFIG).write_text(json.dumps({"config": old}))
  config = rundir.load_config(str(tmp_path))
  assert config.semi.rampup_steps == 200 and config.qc_threshold == 0.27
  assert config.optim.ema_decay == 0.0 and config.data.num_workers == 0
  assert config.model.base_features == 16  # what the run has stays
  schema.validate(config)


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("aug.rotat_deg", 5.0, "config.aug.rotat_deg is not a config key; add it to"),
    ("data.split", "random", "config.data.split='random' must be one of 'hash', 'kfold'"),
    ("data.num_folds", 1, "config.data.num_folds=1 must be an integer >= 2"),
    ("data.examples", "everything", "config.data.examples='everything' must be one of 'with_"),
    ("model.norm", "layer", "config.model.norm='layer' must be one of 'batch', 'group', 'none'"),
    ("tta", "yes", "config.tta='yes' must be a bool"),
    ("aug.elastic_sigma", 0.0, "config.aug.elastic_sigma=0.0 must be > 0"),
    ("batch_size", 2.5, "config.batch_size=2.5 must be an integer >= 1"),
  ],
)
def test_a_wrong_value_or_unknown_key_is_refused_naming_it(key, value, message):
  config = default.get_config().to_dict()
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value
  with pytest.raises(schema.ConfigError, match=re.escape(message)) as raised:
    schema.validate(ml_collections.ConfigDict(config))
  assert "\n" not in str(raised.value)


def test_structural_marks_cover_the_checkpoint_and_the_iterator():
  structural = {key.path for key in KEYS if key.structural is not None}
  assert {"optim.ema_decay", "data.num_workers", "data.image_size", "optim.name"} <= structural
  assert {f"model.{k}" for k in default.get_config().model} - structural == {"model.dtype"}
  run = default.get_config()
  asked = default.get_config()
  asked.optim.ema_decay, asked.optim.grad_clip, asked.model.dtype = 0.99, 0.5, "bfloat16"
  assert schema.structural_changes(run, asked) == [("optim.ema_decay", 0.0, 0.99)]


def _leaves(config, prefix=""):
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{prefix}{name}.")
    else:
      yield f"{prefix}{name}"
