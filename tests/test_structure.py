"""The package's shape: layers, no import cycles, short modules, data code without jax, and a
dataset added by one registry entry."""

import csv
import json
import pickle
import subprocess
import sys

import grimp
import numpy as np
import pytest

from cxr_jax.data import registry
from cxr_jax.data import transforms
from cxr_jax.data.records import Example
from tests.conftest import REPO_ROOT
from tests.test_train import smoke_config

PACKAGE = REPO_ROOT / "cxr_jax"
MAX_MODULE_LINES = 400


def test_no_import_cycles():
  graph = grimp.build_graph("cxr_jax")
  cycles = []
  for module in sorted(graph.modules):
    for imported in graph.find_modules_directly_imported_by(module):
      chain = graph.find_shortest_chain(importer=imported, imported=module)
      if chain:
        cycles.append(" -> ".join((module, *chain)))
  assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_over_the_limit():
  lengths = {
    str(p.relative_to(REPO_ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")
  }
  assert max(lengths.values()) <= MAX_MODULE_LINES, sorted(
    ((n, p) for p, n in lengths.items() if n > MAX_MODULE_LINES), reverse=True
  )


def test_data_code_and_worker_transforms_load_no_jax(tmp_path):
  """What grain workers unpickle (the transforms over a source) needs numpy, not jax."""
  source = [
    {
      "image": np.full((40, 30, 1), 100, np.uint8),
      "mask": np.ones((40, 30, 1), np.uint8),
      "has_mask": True,
      "label": 1,
      "source": 0,
      "id": b"x",
    }
  ]
  path = tmp_path / "transform.pkl"
  path.write_bytes(
    pickle.dumps(
      (
        transforms.ReadExample(source, 16),
        transforms.BalancedIndex([np.arange(3), np.arange(3, 5)], 0),
      )
    )
  )
  code = f"""
import pickle, sys
import cxr_jax.data
from cxr_jax.data import (crops, cxr_masks_and_labels, datasets, images, kaggle, preprocess,
                          registry, transforms)
read, balanced = pickle.loads(open({str(path)!r}, "rb").read())
example = read(0)
assert example["image"].shape == (16, 16, 1) and example["has_mask"] == 1
assert 0 <= balanced(7, None) < 5
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax", "orbax"))
assert not loaded, loaded
"""
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, timeout=120)


# ----- a dataset is a reader plus one registry entry -----


class SquaresReader:
  """A tiny generated dataset: a bright square (the 'lung') on a dark field."""

  skipped: list = []

  def __init__(self, manual_dir: str = "", num_examples: int = 0):
    self.num_examples = num_examples

  def describe(self) -> str:
    return f"{self.num_examples} squares"

  def where(self, file: str) -> str:
    return file

  def items(self):
    return [(f"square_{i:03d}", i) for i in range(self.num_examples)]

  def read(self, index: int, skip) -> Example:
    rng = np.random.default_rng(index)
    size = int(rng.integers(40, 64))
    mask = np.zeros((size, size), np.uint8)
    top, left = rng.integers(4, size // 3, 2)
    mask[top : top + size // 2, left : left + size // 2] = 1
    image = (40 + 150 * mask + rng.integers(0, 30, mask.shape)).astype(np.uint8)
    return Example(
      id=f"square_{index:03d}",
      image=image,
      mask=mask,
      label=index % 2,
      source="squares",
      spacing_mm=(0.5, 0.5),
    )


@pytest.fixture
def squares_kind():
  kind = registry.register(
    registry.DatasetKind(
      name="squares",
      description="Bright squares (a test kind).",
      sources={"squares": "#2ca02c"},
      open_reader=SquaresReader,
      default_size=40,
      id_of=lambda i: f"square_{i:03d}",
    )
  )
  yield kind
  registry.unregister(kind.name)


def test_a_registered_dataset_kind_trains_and_evaluates(squares_kind, tmp_path):
  from cxr_jax import evaluate
  from cxr_jax import results
  from cxr_jax.data import prepare
  from cxr_jax.workflows import train

  assert "squares" in prepare.count_keys()
  config = smoke_config("unet", tmp_path / "tfds")
  config.data.name = "squares"
  config.data.synthetic_examples = 40
  workdir = tmp_path / "run"
  val = train.train_and_evaluate(config, str(workdir))
  assert 0.0 <= val["dice"] <= 1.0
  record = json.loads((workdir / "config.json").read_text())
  assert record["dataset"]["name"] == "cxr_masks_and_labels/squares/1.2.0"
  summary = evaluate.run(str(workdir), "test", show_progress=False)
  per_source = summary["segmentation"]["raw"]["per_source"]
  assert list(per_source) == ["squares"]
  assert per_source["squares"]["hd95_mm"]["count"] == summary["num_images"]  # its spacing
  html = (workdir / "eval" / "test_report.html").read_text()
  assert "<td>squares</td>" in html  # the report's per-source table
  # results: a Dice column for the new source, from the registry (no other edit).
  written = results.write_results(str(tmp_path / "table"), [str(workdir)])
  rows = list(csv.DictReader(open(written[0])))
  dice = per_source["squares"]["dice"]["mean"]
  assert float(rows[0]["dice_squares"]) == pytest.approx(dice, abs=1e-6)  # the CSV's 6 places
  assert "dice_squares" in (tmp_path / "table" / "results.md").read_text()
