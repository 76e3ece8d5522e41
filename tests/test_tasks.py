"""Tasks beyond one lung mask and one label: heart and clavicles (a channel each, the
cardiothoracic ratio), findings (a sigmoid each, unlabelled ones masked), and the two configs'
smoke runs end to end (train, evaluate with its report, predict) on dataset replicas."""

import csv
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import chestxray14 as chestxray14_config
from configs import default
from configs import jsrt_structures
from cxr_jax import evaluate
from cxr_jax import predict
from cxr_jax.core import models
from cxr_jax.core.run import platform
from cxr_jax.core.stats import cardiothoracic
from cxr_jax.core.training import anatomy
from cxr_jax.core.training import augment
from cxr_jax.core.training import multilabel
from cxr_jax.data import chestxray14
from cxr_jax.workflows import train
from tests import replicas


def test_cardiothoracic_ratio_equals_the_hand_computed_one():
  lungs = np.zeros((80, 90), bool)
  lungs[10:70, 10:30] = True  # right lung: columns 10..29
  lungs[15:65, 50:72] = True  # left lung: columns 50..71 -> thorax 10..71 = 62 px
  heart = np.zeros((80, 90), bool)
  heart[40:60, 32:50] = True  # 18 px wide
  heart[52, 28:57] = True  # its widest row: columns 28..56 = 29 px
  assert cardiothoracic.widest(heart) == 29 and cardiothoracic.thorax_width(lungs) == 62
  assert cardiothoracic.cardiothoracic_ratio(heart, lungs) == pytest.approx(29 / 62)
  columns = cardiothoracic.prediction_columns(lungs, {"heart": heart, "clavicles": heart & False})
  assert columns["cardiothoracic_ratio"] == f"{29 / 62:.4f}"
  assert columns["clavicles_fraction"] == "0.000000"
  assert np.isnan(cardiothoracic.cardiothoracic_ratio(heart & False, lungs))


def test_structures_ride_augmentation_as_bits_of_the_lung_mask():
  rng = np.random.default_rng(0)
  mask = jnp.asarray(rng.random((2, 32, 32, 1)) < 0.5, jnp.float32)
  structures = jnp.asarray(rng.random((2, 32, 32, 2)) < 0.3, jnp.float32)
  image = jnp.asarray(rng.random((2, 32, 32, 1)), jnp.float32)
  aug = default.get_config().aug

  @platform.jit
  def moved(key):
    """The packed masks moved once, and each mask moved alone by the same draw."""
    _, packed = augment.augment_batch(key, image, anatomy.pack(mask, structures), aug)
    alone = [
      augment.augment_batch(key, image, m, aug)[1] for m in (mask, *jnp.split(structures, 2, -1))
    ]
    return anatomy.unpack(packed, 2), alone

  (lungs, together), alone = moved(jax.random.key(3))
  np.testing.assert_array_equal(lungs, alone[0])
  np.testing.assert_array_equal(together, jnp.concatenate(alone[1:], -1))
  assert set(np.unique(np.asarray(together)).tolist()) == {0.0, 1.0}


def test_unlabelled_findings_and_unoutlined_structures_teach_nothing():
  logits = jnp.zeros((2, 3))
  targets = jnp.array([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
  weights = jnp.array([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
  grad = jax.grad(lambda x: multilabel.findings_loss(x, targets, weights))(logits)
  assert np.all(np.asarray(grad)[weights == 0] == 0) and np.all(np.asarray(grad)[0, [0, 2]] < 0)
  masks = jnp.ones((2, 8, 8, 2))
  outlined = jnp.array([[1.0, 0.0], [0.0, 0.0]])
  grad = jax.grad(lambda x: anatomy.structure_loss(x, masks, outlined, 1.0))(
    jnp.zeros((2, 8, 8, 2))
  )
  grad = np.asarray(grad)
  assert (grad[0, ..., 0] < 0).all() and not grad[0, ..., 1].any() and not grad[1].any()
  aucs = multilabel.finding_aucs(
    np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.5]]),
    np.array([[1, 0], [0, 1], [1, 1]]),
    np.array([[1, 1], [1, 1], [1, 0]]),
  )
  assert aucs == [1.0, 1.0]


# ----- the two configs' smoke runs -----


def _run(root, module, manual_dir, *, write):
  write(manual_dir)
  config = module.get_config("smoke")
  config.data.manual_dir = str(manual_dir)
  config.data.data_dir = str(root / "tfds")
  workdir = root / "run"
  validation = train.train_and_evaluate(config, str(workdir))
  summary = evaluate.run(str(workdir), "test", show_progress=False)
  inputs = root / "inputs"
  chest = replicas.draw_chest(120, 100, seed=9)
  replicas.png(chest["image"], inputs / "x.png")
  assert predict.run(str(workdir), str(inputs), str(root / "out"), show_progress=False) == 0
  with open(root / "out" / "predictions.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  return {"validation": validation, "summary": summary, "rows": rows, "workdir": workdir}


@pytest.fixture(scope="module")
def jsrt_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("jsrt_structures")
  return _run(root, jsrt_structures, root / "jsrt", write=replicas.write_jsrt)


@pytest.fixture(scope="module")
def nih_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("chestxray14")
  return _run(root, chestxray14_config, root / "nih", write=replicas.write_chestxray14)


def test_jsrt_structures_smoke_validates_evaluates_and_predicts_each_structure(jsrt_run):
  validation = jsrt_run["validation"]
  assert {"dice", "heart_dice", "clavicles_dice", "struct_loss"} <= set(validation)
  structures = jsrt_run["summary"]["structures"]
  assert structures["heart"]["count"] == structures["clavicles"]["count"] == 1  # JPCLN001
  assert 0 <= structures["heart"]["dice"] <= 1
  html = (jsrt_run["workdir"] / "eval" / "test_report.html").read_text()
  assert "Structures (native size)" in html
  assert "Best, median and worst heart" in html  # each structure in its colour
  assert (jsrt_run["workdir"] / "eval" / "test_structures.png").stat().st_size > 10_000
  with open(jsrt_run["workdir"] / "eval" / "test.csv", newline="") as f:
    by_id = {r["id"]: r for r in csv.DictReader(f)}
  chest = replicas.draw_chest(1024, 1024, seed=100)  # JPCLN001, as the replica drew it
  expected = cardiothoracic.cardiothoracic_ratio(chest["heart"], chest["lungs"])
  assert float(by_id["JPCLN001"]["cardiothoracic_ratio_true"]) == pytest.approx(expected, abs=1e-6)
  (row,) = jsrt_run["rows"]
  assert {"heart_fraction", "clavicles_fraction", "cardiothoracic_ratio"} <= set(row)
  out = jsrt_run["workdir"].parent / "out"
  assert (out / "masks_heart" / "x.png").exists() and (out / "masks_clavicles" / "x.png").exists()


def test_chestxray14_smoke_reports_every_finding(nih_run):
  assert "findings_auc" in nih_run["validation"]
  findings = nih_run["summary"]["findings"]
  assert list(findings["per_finding"]) == list(chestxray14.FINDINGS)
  assert findings["per_finding"]["Cardiomegaly"]["labelled"] > 0
  html = (nih_run["workdir"] / "eval" / "test_report.html").read_text()
  assert "ROC per finding" in html
  (row,) = nih_run["rows"]
  assert [k for k in row if k.startswith("p_")] == [f"p_{n}" for n in chestxray14.FINDINGS]
  assert all(0 <= float(row[f"p_{n}"]) <= 1 for n in chestxray14.FINDINGS)
  json.dumps(findings)  # the summary is plain JSON
  assert pathlib.Path(nih_run["workdir"] / "eval" / "test.json").exists()


def test_structures_with_a_torchvision_encoder_are_refused_in_one_line():
  config = jsrt_structures.get_config("smoke")
  config.model.encoder = "resnet18"
  with pytest.raises(ValueError, match=r"encoder='resnet18'.*set encoder=''"):
    models.create_model(config.model, rngs=None)
