"""A researcher's own folder, end to end with the commands a user runs: a script writes
images/ (PNG) and masks/ (0/255) with matching stems, prepares them, trains the smoke U-Net
with --config.data.name=folders, evaluates (per-image Dice at each image's native size) and
predicts."""

import csv
import pathlib

import numpy as np
import pytest
from PIL import Image

from cxr_jax import evaluate
from tests import replicas
from tests.conftest import run_command
from tests.conftest import run_module
from tests.conftest import smoke_command


def _rows(path: pathlib.Path) -> list[dict]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def folders_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("folders")
  chests = replicas.write_folders(root / "mine", count=40, size=(72, 60))
  (root / "mine" / "labels.csv").unlink()  # images and masks only: split by the stems' hash
  data_dir, workdir = root / "tfds", root / "run"
  prepared = run_module(
    "cxr_jax.data.prepare",
    "--dataset=folders",
    f"--manual_dir={root / 'mine'}",
    f"--data_dir={data_dir}",
  )
  assert prepared.returncode == 0, prepared.stderr[-2000:]
  run_command(
    smoke_command(
      workdir,
      data_dir,
      "--config.data.name=folders",
      f"--config.data.manual_dir={root / 'mine'}",
    )
  )
  evaluate.run(str(workdir), "test", show_progress=False)  # in this process: no second start-up
  predicted = run_module(
    "cxr_jax.predict",
    f"--workdir={workdir}",
    f"--input={root / 'mine' / 'images'}",
    f"--output={root / 'out'}",
  )
  assert predicted.returncode == 0, predicted.stderr[-2000:]
  return {"root": root, "chests": chests, "prepare": prepared.stdout, "workdir": workdir}


def test_prepare_counts_every_folder_image_with_its_mask(folders_run):
  out = folders_run["prepare"]
  assert "cxr_masks_and_labels/folders/1.2.0" in out
  assert any(line.split()[:4] == ["all", "40", "40", "0"] for line in out.splitlines()), out
  assert "skipped files: 0" in out


def test_evaluate_scores_each_test_image_at_its_native_size(folders_run):
  rows = _rows(folders_run["workdir"] / "eval" / "test.csv")
  assert rows and all(r["source"] == "folders" for r in rows)
  for row in rows:
    assert (int(row["height"]), int(row["width"])) == (72, 60)
    assert 0.0 <= float(row["dice"]) <= 1.0
  assert set(r["id"] for r in rows) <= set(folders_run["chests"])


def test_predict_writes_a_native_size_mask_per_image(folders_run):
  out = folders_run["root"] / "out"
  rows = _rows(out / "predictions.csv")
  assert len(rows) == 40
  for row in rows[:5]:
    mask = np.asarray(Image.open(out / "masks" / f"{pathlib.Path(row['image']).stem}.png"))
    assert mask.shape == (72, 60) and set(np.unique(mask)) <= {0, 255}
