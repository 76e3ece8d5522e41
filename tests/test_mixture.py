"""config.data.mixture: several prepared datasets trained together, drawn by weight, with
validation and test per source and pooled (data/mixture.py, core/run/run_data.py)."""

import csv
import json

import ml_collections
import numpy as np
import pytest

from configs import jsrt_structures
from cxr_jax import evaluate
from cxr_jax import results
from cxr_jax.data import chestxray14
from cxr_jax.data import findings as findings_lib
from cxr_jax.data import input_pipeline
from cxr_jax.data import mixture
from cxr_jax.errors import ConfigError
from cxr_jax.workflows import train
from tests import replicas


def test_entries_parse_with_their_files_and_weights_and_bad_ones_are_named():
  entries = mixture.parse(" kaggle:2, jsrt@/data/jsrt:0.5,folders@gs://bucket/f ,")
  assert entries == (
    mixture.Entry("kaggle", "", 2.0),
    mixture.Entry("jsrt", "/data/jsrt", 0.5),
    mixture.Entry("folders", "gs://bucket/f", 1.0),
  )
  assert mixture.parse("") == ()
  for text, message in [
    ("kaggle:x", r"'kaggle:x'.*weight after ':' must be a number"),
    ("kaggle,nih:1", r"'nih:1'.*unknown dataset 'nih'; known: kaggle"),
    ("jsrt:0", r"'jsrt:0'.*must be > 0"),
    ("jsrt,kaggle,jsrt:2", r"names jsrt more than once"),
  ]:
    with pytest.raises(ConfigError, match=message):
      mixture.parse(text)


def _records(prefix: str, count: int, findings: list[int] | None = None) -> list[dict]:
  return [
    {"id": f"{prefix}{i}".encode(), "findings": np.array(findings or [], np.int8)}
    for i in range(count)
  ]


def test_the_joined_source_indexes_every_part_and_recodes_findings_over_their_union():
  nih = _records("n", 3, [1, 0])  # labels Effusion, Nodule
  other = _records("o", 2, [-1])  # labels Mass only (uncertain)
  joined = mixture.MixtureSource(
    [nih, other], ["chestxray14", "chexpert"], [1.0, 2.0], [("Effusion", "Nodule"), ("Mass",)]
  )
  assert len(joined) == 5 and joined.finding_names == ("Effusion", "Nodule", "Mass")
  assert [joined[i]["id"] for i in range(5)] == [b"n0", b"n1", b"n2", b"o0", b"o1"]
  assert joined.locate(3) == (1, 0)
  missing = findings_lib.MISSING
  np.testing.assert_array_equal(joined[0]["findings"], [1, 0, missing])
  np.testing.assert_array_equal(joined[4]["findings"], [missing, missing, -1])
  with pytest.raises(IndexError):
    joined[5]


def test_training_draws_each_dataset_by_its_weight_and_every_image_each_epoch():
  small, large = _records("s", 10), _records("l", 30)
  joined = mixture.MixtureSource([small, large], ["a", "b"], [3.0, 1.0], [(), ()])
  config = ml_collections.ConfigDict(
    {"seed": 0, "data": {"examples": "all", "balance_classes": False}}
  )
  stream = input_pipeline._mixed_train_indices(config, joined, 0, 1)
  drawn = np.array([stream[i] for i in range(1200)])
  from_small = (drawn < 10).mean()
  assert from_small == pytest.approx(0.75, abs=0.02)  # 3 : 1, not 10 : 30
  # Each dataset's stream is its own reshuffled epochs: 30 draws of the small one hold all
  # 10 of its images; the first 30 of the large one, every one of its 30.
  assert set(drawn[drawn < 10][:10].tolist()) == set(range(10))
  assert set(drawn[drawn >= 10][:30].tolist()) == set(range(10, 40))
  # Two processes draw disjoint halves of each dataset.
  halves = [input_pipeline._mixed_train_indices(config, joined, p, 2) for p in (0, 1)]
  seen = [{int(h[i]) for i in range(160)} for h in halves]
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(40))


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
  """JSRT (lungs, heart, clavicles; no findings) and ChestX-ray14 (findings; no masks) in one
  run of a U-Net with a structures head and a findings head: each head learns where its labels
  exist."""
  root = tmp_path_factory.mktemp("mixture")
  replicas.write_jsrt(root / "jsrt")
  replicas.write_chestxray14(root / "nih", patients=12)
  config = jsrt_structures.get_config("smoke")
  config.model.findings = ",".join(chestxray14.FINDINGS)
  config.data.mixture = f"jsrt@{root / 'jsrt'}:1,chestxray14@{root / 'nih'}:1"
  config.data.data_dir = str(root / "tfds")
  config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
  workdir = root / "run"
  validation = train.train_and_evaluate(config, str(workdir))
  summary = evaluate.run(str(workdir), "test", show_progress=False)
  return {"validation": validation, "summary": summary, "workdir": workdir}


def test_a_mixture_trains_both_heads_and_evaluates_each_source_and_pooled(mixed_run):
  workdir, summary = mixed_run["workdir"], mixed_run["summary"]
  assert {"dice", "heart_dice", "findings_auc"} <= set(mixed_run["validation"])
  record = json.loads((workdir / "config.json").read_text())
  assert record["config"]["data"]["name"] == "mixture"
  parts = record["dataset"]["mixture"]
  assert [(p["resolved"], p["weight"]) for p in parts] == [("jsrt", 1.0), ("chestxray14", 1.0)]
  with open(workdir / "eval" / "test.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  counts = {s: sum(r["source"] == s for r in rows) for s in ("jsrt", "chestxray14")}
  assert counts["jsrt"] > 0 and counts["chestxray14"] > 0
  assert summary["num_images"] == len(rows) == sum(counts.values())
  # Structures: outlined in JSRT only. Findings: ChestX-ray14 labels all 14, JSRT only its
  # nodules (JPCLN: nodule, JPCNN: none), so its images count for Nodule alone.
  structures = summary["structures"]["per_source"]
  assert structures["jsrt"]["heart"]["count"] == summary["structures"]["heart"]["count"] > 0
  assert structures["chestxray14"]["heart"]["count"] == 0
  findings = summary["findings"]["per_source"]
  jsrt = {n: v["labelled"] for n, v in findings["jsrt"]["per_finding"].items()}
  assert jsrt.pop("Nodule") == counts["jsrt"] and set(jsrt.values()) == {0}
  pooled = summary["findings"]["per_finding"]
  assert findings["chestxray14"]["per_finding"]["Effusion"]["labelled"] == counts["chestxray14"]
  assert pooled["Nodule"]["labelled"] == len(rows) and pooled["Effusion"]["labelled"] < len(rows)
  assert set(summary["segmentation"]["raw"]["per_source"]) == {"jsrt"}  # masks: JSRT's
  html = (workdir / "eval" / "test_report.html").read_text()
  assert html.count("<h3>Per source</h3>") == 3  # lungs, structures and findings
  assert "<td>chestxray14</td><td>macro AUC" in html and "<td>jsrt</td><td>heart Dice" in html
  row = results.read_run(str(workdir), "test")["row"]
  assert row["heart_dice"] == summary["structures"]["heart"]["dice"]
  assert row["findings_auc"] == summary["findings"]["macro_auc"]
  assert row["dice_jsrt"] == summary["segmentation"]["raw"]["per_source"]["jsrt"]["dice"]["mean"]


def test_a_mixture_entry_neither_prepared_nor_found_says_how_to_prepare_it(tmp_path):
  config = jsrt_structures.get_config("smoke")
  config.data.mixture = "jsrt:1"
  config.data.data_dir = str(tmp_path / "tfds")
  with pytest.raises(ValueError, match=r"python -m cxr_jax.data.prepare --dataset=jsrt"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
