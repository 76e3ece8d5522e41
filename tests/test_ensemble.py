"""Fold ensembles: predict with several runs' mean (core/inference/ensemble.py)."""

import csv
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cxr_jax import evaluate
from cxr_jax import predict
from cxr_jax.core import models
from cxr_jax.core.inference import ensemble
from cxr_jax.core.inference import portable
from cxr_jax.core.inference.inference import Inference
from cxr_jax.core.inference.inference import uncertainty
from cxr_jax.core.run import rundir
from cxr_jax.errors import ConfigError
from cxr_jax.workflows import ensemble_eval
from cxr_jax.workflows import train
from tests import replicas
from tests.conftest import run_module
from tests.test_train import smoke_config


def _members(config, seeds):
  return [
    Inference(config, models.create_model(config.model, rngs=nnx.Rngs(s)), batch_size=2)
    for s in seeds
  ]


def test_the_ensemble_answers_the_members_mean_and_the_uncertainty_of_that_mean(tmp_path):
  config = smoke_config("multitask", tmp_path)
  members = _members(config, (0, 1, 2))
  joined = ensemble.Ensemble(members, ["a", "b", "c"])
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 1)).astype(np.float32)
  alone = [m(images) for m in members]
  got = joined(images)
  assert set(got) == {"prob", "p_abnormal", "uncertainty"}
  for key in ("prob", "p_abnormal"):
    np.testing.assert_allclose(got[key], np.mean([a[key] for a in alone], axis=0), atol=1e-7)
  assert not np.allclose(alone[0]["prob"], alone[1]["prob"])  # the members differ
  np.testing.assert_allclose(got["uncertainty"], uncertainty(jnp.asarray(got["prob"])), rtol=1e-6)
  assert joined.segments and joined.classifies and joined.image_size == 32


def test_runs_of_other_recipes_are_refused_naming_both(tmp_path):
  config = smoke_config("unet", tmp_path)
  other = smoke_config("multitask", tmp_path)
  (unet,) = _members(config, (0,))
  (multitask,) = _members(other, (0,))
  with pytest.raises(ConfigError, match=r"differ in classifies: fold0 has False, fold1 True"):
    ensemble.Ensemble([unet, multitask], ["fold0", "fold1"])


@pytest.fixture(scope="module")
def folds(tmp_path_factory):
  """Two 2-step U-Nets of different seeds in a sweep's layout (variant/seed*)."""
  root = tmp_path_factory.mktemp("ensemble")
  for seed in (0, 1):
    config = smoke_config("unet", root / "tfds")
    config.seed, config.num_train_steps = seed, 2
    config.eval_every_steps = config.checkpoint_every_steps = 2
    train.train_and_evaluate(config, str(root / "unet" / f"seed{seed}"))
  return root


def test_predict_with_a_variant_folder_averages_its_folds(folds, tmp_path):
  runs = rundir.ensemble_runs(str(folds / "unet"))
  assert [r.rsplit("/", 1)[1] for r in runs] == ["seed0", "seed1"]
  assert rundir.ensemble_runs(",".join(runs)) == runs
  with pytest.raises(ConfigError, match=r"is not a run directory"):
    rundir.ensemble_runs(str(folds / "tfds"))
  chest = replicas.draw_chest(90, 80, seed=3)
  replicas.png(chest["image"], tmp_path / "in" / "x.png")
  outputs = {}
  for name, workdir in [("ensemble", str(folds / "unet")), ("seed0", runs[0])]:
    out = tmp_path / name
    assert predict.run(workdir, str(tmp_path / "in"), str(out), show_progress=False) == 0
    with open(out / "predictions.csv", newline="") as f:
      (outputs[name],) = list(csv.DictReader(f))
  record = json.loads((tmp_path / "ensemble" / "predict.json").read_text())
  assert "an ensemble of 2 runs" in json.dumps(record)
  assert outputs["ensemble"]["uncertainty"] != outputs["seed0"]["uncertainty"]


def _read_csv(path) -> dict[str, dict]:
  with open(path, newline="") as f:
    return {row["id"]: row for row in csv.DictReader(f)}


def test_evaluate_scores_the_ensemble_and_its_paired_difference_to_each_run(folds, tmp_path):
  runs = rundir.ensemble_runs(str(folds / "unet"))
  with pytest.raises(ConfigError, match=r"--out=OUT is needed"):
    evaluate.run(str(folds / "unet"), "test", show_progress=False)
  with pytest.raises(ConfigError, match=r"is for an ensemble"):
    evaluate.run(runs[0], "test", out=str(tmp_path / "x"), show_progress=False)
  for run in runs:
    evaluate.run(run, "test", show_progress=False)
  before = (pathlib.Path(runs[0]) / "eval" / "test.csv").read_text()
  evaluate.run(runs[0], "test", batch_size=3, show_progress=False)  # again, over the first
  assert (pathlib.Path(runs[0]) / "eval" / "test.csv").read_text() == before
  out = tmp_path / "ensemble"
  summary = evaluate.run(str(folds / "unet"), "test", out=str(out), show_progress=False)
  ours = _read_csv(out / "eval" / "test.csv")
  theirs = [_read_csv(f"{run}/eval/test.csv") for run in runs]
  assert set(ours) == set(theirs[0]) == set(theirs[1]) and len(ours) > 4
  masked = [i for i in ours if ours[i]["dice"]]
  assert any(ours[i]["dice"] != theirs[0][i]["dice"] for i in masked)  # another model
  record = summary["ensemble"]
  assert json.loads((out / "ensemble.json").read_text())["runs"] == runs == record["runs"]
  assert [entry["images"] for entry in record["runs_compared"]] == [len(ours)] * 2
  dice = record["vs_runs"]["dice"]
  runs_mean = np.mean([np.mean([float(t[i]["dice"]) for t in theirs]) for i in masked])
  ensemble_mean = np.mean([float(ours[i]["dice"]) for i in masked])
  assert dice["images"] == len(masked)
  assert dice["runs_mean"] == pytest.approx(runs_mean, abs=1e-9)
  assert dice["difference"] == pytest.approx(ensemble_mean - runs_mean, abs=1e-9)
  assert dice["ci95"][0] <= dice["difference"] <= dice["ci95"][1]
  for entry, table in zip(record["runs_compared"], theirs, strict=True):
    alone = np.mean([float(table[i]["dice"]) for i in masked])
    assert entry["dice"]["difference"] == pytest.approx(ensemble_mean - alone, abs=1e-9)
  assert json.loads((out / "eval" / "test.json").read_text())["ensemble"]["runs"] == runs


def test_an_ensemble_is_scored_only_on_images_none_of_its_runs_trained_on():
  import ml_collections  # noqa: PLC0415

  def config(fold, outer=-1, size=32):
    data = {"split": "kfold", "num_folds": 5, "fold": fold, "outer_fold": outer}
    return ml_collections.ConfigDict({"data": {**data, "image_size": size, "num_workers": 0}})

  check = ensemble_eval.check_same_images
  with pytest.raises(ConfigError, match=r"different test images \(config.data.fold \[1, 2\]\)"):
    check(["a", "b"], [config(1), config(2)], "test")  # each tested on what the other trained on
  check(["a", "b"], [config(1, outer=0), config(2, outer=0)], "test")  # nested: fold 0 for both
  with pytest.raises(ConfigError, match=r"different validation images"):
    check(["a", "b"], [config(1, outer=0), config(2, outer=0)], "validation")
  with pytest.raises(ConfigError, match=r"a has config.data.image_size=32, b 64"):
    check(["a", "b"], [config(1, outer=0), config(2, outer=0, size=64)], "test")


def test_export_writes_the_ensemble_as_one_file_computing_its_mean(folds, tmp_path):
  runs = rundir.ensemble_runs(str(folds / "unet"))
  path = tmp_path / "ensemble.cxr"
  done = run_module("cxr_jax.export", f"--workdir={folds / 'unet'}", f"--output={path}")
  assert done.returncode == 0 and "an ensemble of 2 runs" in done.stderr, done.stderr[-2000:]
  exported = portable.PortableModel(path, batch_size=2)
  assert exported.settings["members"] == 2 and exported.settings["runs"] == runs
  members = []
  for run in runs:
    config, model, _ = rundir.restore_model(run, "best")
    members.append(Inference(config, model, batch_size=2))
  images = np.random.default_rng(1).normal(size=(2, 32, 32, 1)).astype(np.float32)
  want = ensemble.Ensemble(members, runs)(images)
  got = exported(images)
  assert set(got) == set(want) == {"prob", "uncertainty"}
  for key in want:
    np.testing.assert_allclose(got[key], want[key], atol=2e-6)
  alone = members[0](images)["prob"]
  assert np.abs(got["prob"] - alone).max() > 1e-3  # the mean, not the first run
