"""Evaluation protocols: k-fold and cross-site splits as views over the prepared dataset."""

import collections
import random

import ml_collections
import pytest

from cxr_jax import errors
from cxr_jax.core.run import run_data
from cxr_jax.data import datasets
from cxr_jax.data import protocols
from cxr_jax.data import records
from cxr_jax.workflows import sweeps

SOURCES = ("montgomery", "shenzhen", "synthetic")


def _meta(n: int = 659, seed: int = 0) -> list[dict]:
  """Records like the archive's: two sources of unequal size, both labels, hash splits."""
  rng = random.Random(seed)
  meta = []
  for i in range(n):
    source = 0 if i < 110 else 1
    prefix = "MCUCXR" if source == 0 else "CHNCXR"
    label = rng.random() < 0.45
    meta.append(
      {
        "id": f"{prefix}_{i:04d}_{int(label)}",
        "source": source,
        "label": int(label),
        "split": rng.choice(["train"] * 8 + ["validation", "test"]),
        "position": i,
      }
    )
  return meta


def _config(**data) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    {"split": "kfold", "num_folds": 5, "fold": 0, "train_sources": "montgomery", **data}
  )


def test_kfold_test_folds_partition_the_images_and_are_stratified():
  meta = _meta()
  tests, validations = collections.Counter(), collections.Counter()
  per_fold = []
  for fold in range(5):
    splits = protocols.assign_splits(meta, _config(fold=fold), SOURCES)
    tested = [m for m, s in zip(meta, splits) if s == "test"]
    tests.update(m["id"] for m in tested)
    validations.update(m["id"] for m, s in zip(meta, splits) if s == "validation")
    per_fold.append(collections.Counter((m["source"], m["label"]) for m in tested))
    assert collections.Counter(splits) == {
      "test": len(tested),
      "validation": collections.Counter(splits)["validation"],
      "train": len(meta) - len(tested) - collections.Counter(splits)["validation"],
    }
  assert set(tests.values()) == {1} and len(tests) == len(meta)  # each id tested exactly once
  assert set(validations.values()) == {1} and len(validations) == len(meta)
  for stratum in {(m["source"], m["label"]) for m in meta}:
    counts = [fold[stratum] for fold in per_fold]
    assert max(counts) - min(counts) <= 1, (stratum, counts)
  totals = [sum(fold.values()) for fold in per_fold]
  strata = len({(m["source"], m["label"]) for m in meta})
  assert max(totals) - min(totals) <= strata, totals  # each stratum's extra image at most


def test_nested_kfold_tests_every_run_on_the_outer_fold_none_trains_on():
  meta = _meta()
  plain = protocols.assign_splits(meta, _config(fold=0), SOURCES)
  outer = {m["id"] for m, s in zip(meta, plain) if s == "test"}  # fold 0
  validated = collections.Counter()
  for fold in (1, 2, 3, 4):
    splits = protocols.assign_splits(meta, _config(fold=fold, outer_fold=0), SOURCES)
    assert {m["id"] for m, s in zip(meta, splits) if s == "test"} == outer
    unfolded = protocols.assign_splits(meta, _config(fold=fold), SOURCES)
    # its validation is the fold the plain protocol tests: the inner folds rotate over it
    assert [s == "validation" for s in splits] == [s == "test" for s in unfolded]
    assert all(
      s == "train" for m, s in zip(meta, splits) if m["id"] not in outer and s != "validation"
    )
    validated.update(m["id"] for m, s in zip(meta, splits) if s == "validation")
  assert set(validated.values()) == {1} and len(validated) == len(meta) - len(outer)
  for fold, outer_fold in ((0, 0), (1, 5), (1, -2)):
    with pytest.raises(ValueError, match="outer_fold"):
      protocols.assign_splits(meta, _config(fold=fold, outer_fold=outer_fold), SOURCES)


def test_a_nested_sweep_leaves_out_the_outer_fold():
  sweep = sweeps.Sweep(
    config="c.py", variants={"unet": {}}, folds=5, overrides={"data.outer_fold": 2}
  )
  assert [run.fold for run in sweeps.expand(sweep)] == [0, 1, 3, 4]
  # `sweep --override=data.outer_fold=2` hands the value over as text
  sweep = sweeps.Sweep(
    config="c.py", variants={"unet": {}}, folds=5, overrides={"data.outer_fold": "2"}
  )
  assert [run.fold for run in sweeps.expand(sweep)] == [0, 1, 3, 4]


def test_a_cross_site_override_replaces_a_sweeps_folds():
  sweep = sweeps.Sweep(config="c.py", variants={"a": {}, "b": {"x": 1}}, folds=5)
  runs = sweeps.expand(
    sweeps.with_overrides(sweep, {"data.split": "cross_site", "data.train_sources": "shenzhen"})
  )
  assert [run.name for run in runs] == ["a/seed0", "b/seed0"]
  assert runs[1].overrides == {
    "data.split": "cross_site",
    "data.train_sources": "shenzhen",
    "x": 1,
    "seed": 0,
  }
  kept = sweeps.with_overrides(sweep, {"data.manual_dir": "/d"})
  assert [run.fold for run in sweeps.expand(kept)] == [0, 1, 2, 3, 4] * 2


def test_kfold_keeps_every_fold_when_images_are_appended():
  meta = _meta(600)
  before = protocols.assign_splits(meta, _config(fold=2), SOURCES)
  grown = meta + _meta(659)[600:]  # the next ids of both sources, as a new release adds them
  after = protocols.assign_splits(grown, _config(fold=2), SOURCES)
  assert after[: len(meta)] == before


def test_kfold_depends_on_the_ids_not_on_the_reading_order():
  meta = _meta()
  shuffled = list(meta)
  random.Random(1).shuffle(shuffled)
  folds = dict(
    zip(
      [m["id"] for m in meta],
      protocols.kfold_assignment(
        [m["id"] for m in meta], [(m["source"], m["label"]) for m in meta], 5
      ),
    )
  )
  again = dict(
    zip(
      [m["id"] for m in shuffled],
      protocols.kfold_assignment(
        [m["id"] for m in shuffled], [(m["source"], m["label"]) for m in shuffled], 5
      ),
    )
  )
  assert folds == again


def test_cross_site_trains_on_one_source_and_tests_on_the_other():
  meta = _meta()
  for train_source, test_source in ((0, 1), (1, 0)):
    config = _config(split="cross_site", train_sources=SOURCES[train_source])
    splits = protocols.assign_splits(meta, config, SOURCES)
    assert {m["source"] for m, s in zip(meta, splits) if s == "test"} == {test_source}
    assert {m["source"] for m, s in zip(meta, splits) if s != "test"} == {train_source}
    assert {m["split"] for m, s in zip(meta, splits) if s == "validation"} == {"validation"}
  with pytest.raises(ValueError, match="train_sources='bethesda'"):
    protocols.assign_splits(meta, _config(split="cross_site", train_sources="bethesda"), SOURCES)
  with pytest.raises(ValueError, match="config.data.split='random'"):
    protocols.assign_splits(meta, _config(split="random"), SOURCES)


def test_a_protocol_is_a_view_over_the_prepared_splits(tmp_path):
  data = ml_collections.ConfigDict(
    {
      "name": "synthetic",
      "manual_dir": "",
      "synthetic_examples": 60,
      "data_dir": str(tmp_path),
      "split": "kfold",
      "num_folds": 3,
      "fold": 1,
      "train_sources": "",
    }
  )
  config = ml_collections.ConfigDict({"data": data})
  dataset = run_data.open_dataset(data)
  views = {split: run_data.load_split(config, split, dataset) for split in protocols.SPLITS}
  ids = {
    split: [records.decode_id(view[i]["id"]) for i in range(len(view))]
    for split, view in views.items()
  }
  every = [
    records.decode_id(r["id"])
    for name in dataset.builder.info.splits
    for r in datasets.split_source(dataset.builder, name, skip_decoding=("image", "mask"))
  ]
  assert sorted(sum(ids.values(), [])) == sorted(every)  # a partition of the whole dataset
  assert abs(len(ids["test"]) - 20) <= 1 and views["train"][0]["image"].ndim == 3
  undecoded = views["test"].skip_decoding(("image",))
  assert isinstance(undecoded[0]["image"], bytes)


def test_a_sweeps_stress_evaluations_run_before_the_one_that_marks_it_done(tmp_path):
  sweep = sweeps.Sweep(config="configs/unet.py", variants={"a": {}}, stress=("consolidation",))
  (run,) = sweeps.expand(sweep)
  train, stressed, evaluate = sweeps.commands(sweep, run, sweeps.run_dir(str(tmp_path), run))
  assert "cxr_jax.main" in train and "cxr_jax.evaluate" in evaluate
  assert stressed == [*evaluate, "--stress=consolidation"]  # same run, split and checkpoint
  assert not any(arg.startswith("--stress") for arg in evaluate)  # its test.json marks done
  plain = sweeps.Sweep(config="configs/unet.py", variants={"a": {}})
  assert len(sweeps.commands(plain, run, sweeps.run_dir(str(tmp_path), run))) == 2
  with pytest.raises(errors.ConfigError, match="snow"):
    sweeps.expand(sweeps.Sweep(config="configs/unet.py", variants={"a": {}}, stress=("snow",)))
