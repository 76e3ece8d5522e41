"""Sweeps and results: an interrupted smoke sweep finishes every run once, and the table is
the runs' own numbers."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from cxr_jax import results
from cxr_jax.workflows import sweeps
from tests.conftest import REPO_ROOT


def _sweep_file(tmp_path, data_dir) -> str:
  path = tmp_path / "smoke_sweep.py"
  path.write_text(
    textwrap.dedent(f"""
      from cxr_jax.workflows.sweeps import Sweep

      def get_sweep():
        return Sweep(
            config="{REPO_ROOT}/configs/unet.py:smoke",
            variants={{"unet": {{}}, "attention": {{"model.name": "attention_unet"}}}},
            seeds=(0, 1),
            overrides={{"data.data_dir": "{data_dir}", "num_train_steps": 4,
                       "eval_every_steps": 2, "checkpoint_every_steps": 2}},
            split="test",
            baseline="unet")
      """)
  )
  return str(path)


def test_expand_product_and_zipped():
  variants = sweeps.product(
    model={"u": {"model.name": "unet"}, "a": {"model.name": "x"}},
    aug={"off": {"aug.enabled": False}, "on": {}},
  )
  assert list(variants) == [
    "model=u,aug=off",
    "model=u,aug=on",
    "model=a,aug=off",
    "model=a,aug=on",
  ]
  assert variants["model=a,aug=off"] == {"model.name": "x", "aug.enabled": False}
  assert sweeps.zipped(["s", "b"], **{"data.image_size": [128, 256]}) == {
    "s": {"data.image_size": 128},
    "b": {"data.image_size": 256},
  }
  runs = sweeps.expand(sweeps.Sweep(config="c.py", variants={"v": {"a": 1}}, seeds=(3,), folds=2))
  assert [r.name for r in runs] == ["v/seed3_fold0", "v/seed3_fold1"]
  assert runs[1].overrides == {
    "a": 1,
    "seed": 3,
    "data.split": "kfold",
    "data.num_folds": 2,
    "data.fold": 1,
  }


def test_an_interrupted_sweep_resumes_and_ends_with_every_run_once(tmp_path):
  data_dir = tmp_path / "tfds"
  sweep_file, root = _sweep_file(tmp_path, data_dir), tmp_path / "sweep"
  command = [sys.executable, "-m", "cxr_jax.sweep", f"--sweep={sweep_file}", f"--root={root}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  first = subprocess.Popen(
    command,
    cwd=REPO_ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    start_new_session=True,
  )
  done_first = root / "unet" / "seed0" / "eval" / "test.json"
  deadline = time.time() + 300
  while not done_first.exists() and time.time() < deadline and first.poll() is None:
    time.sleep(0.5)
  os.killpg(first.pid, signal.SIGKILL)  # the sweep and the run it was in
  first.wait()
  assert done_first.exists()
  finished_at = done_first.stat().st_mtime
  rerun = subprocess.run(
    command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "4 runs, 1 done, 3 to run" in rerun.stderr
  assert done_first.stat().st_mtime == finished_at  # a finished run is not run again
  for variant in ("unet", "attention"):
    for seed in (0, 1):
      run = root / variant / f"seed{seed}"
      steps = [
        json.loads(line)["step"]
        for line in open(run / "metrics.jsonl")
        if json.loads(line)["split"] == "train"
      ]
      assert steps == sorted(set(steps)) and steps[-1] == 4  # trained once, to the end
      assert json.loads((run / "sweep.json").read_text())["seed"] == seed

  # The table is the runs' own numbers.
  with open(root / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 4
  for row in rows:
    summary = json.loads(
      (root / row["variant"] / f"seed{row['seed']}" / "eval" / "test.json").read_text()
    )
    assert float(row["dice"]) == pytest.approx(
      summary["segmentation"]["raw"]["all"]["dice"]["mean"], rel=1e-5
    )
    with open(root / row["variant"] / f"seed{row['seed']}" / "eval" / "test.csv") as f:
      dice = sorted(float(r["dice"]) for r in csv.DictReader(f) if r["dice"])
    worst = dice[: max(1, math.ceil(len(dice) / 10))]
    assert float(row["dice_worst10"]) == pytest.approx(np.mean(worst), rel=1e-5)
    quality = summary["segmentation"]["quality"]["auroc"]  # null where one class is missing
    assert row["qc_auroc"] == "" if quality is None else float(row["qc_auroc"]) == quality
  markdown = (root / "results.md").read_text()
  unet = [float(r["dice"]) for r in rows if r["variant"] == "unet"]
  assert f"| unet | 2 | {np.mean(unet):.4f} +- {np.std(unet, ddof=1):.4f}" in markdown
  assert "attention" in markdown and "vs unet (paired)" in markdown
  assert "<img" in (root / "results.html").read_text()


def test_paired_differences_by_hand(tmp_path):
  """Two variants on the same three images: Dice differences and AUC differences paired."""
  for variant, dice, scores in (
    ("base", [0.9, 0.8, 0.7, 0.6], [0.2, 0.4, 0.6, 0.8]),
    ("new", [0.95, 0.85, 0.75, 0.65], [0.8, 0.6, 0.4, 0.2]),
  ):
    run = tmp_path / variant
    (run / "eval").mkdir(parents=True)
    (run / "sweep.json").write_text(json.dumps({"variant": variant, "seed": 0, "fold": None}))
    (run / "eval" / "test.json").write_text(
      json.dumps(
        {
          "step": 1,
          "num_images": 4,
          "segmentation": {
            "raw": {
              "all": {
                m: {"mean": float(np.mean(dice)) if m == "dice" else 1.0}
                for m in ("dice", "hd95_px", "asd_px")
              }
            }
          },
          "classification": {"auc": 1.0 if variant == "base" else 0.0, "accuracy": 0.5},
        }
      )
    )
    with open(run / "eval" / "test.csv", "w") as f:
      f.write("id,label,dice,p_abnormal\n")
      for k, (d, p) in enumerate(zip(dice, scores)):
        f.write(f"img{k},{int(k >= 2)},{d},{p}\n")
    lines = [
      {"step": 1, "split": "validation", "dice": 0.91, "online_dice": 0.90},
      {"step": 2, "split": "validation", "dice": 0.95, "online_dice": 0.93},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  runs = [results.read_run(str(tmp_path / v), "test") for v in ("base", "new")]
  # The EMA's effect: validation Dice of both weight sets at the evaluated step (1).
  assert (runs[0]["row"]["val_dice"], runs[0]["row"]["val_online_dice"]) == (0.91, 0.90)
  diff = results.compare(runs, "base")["new"]
  assert diff["dice"][0] == pytest.approx(0.05) and diff["dice"][3] == 4
  assert diff["dice"][1] == pytest.approx(0.05) and diff["dice"][2] == pytest.approx(0.05)
  assert diff["auc"][0] == pytest.approx(-1.0)  # the new scores rank every pair backwards
  assert diff["dice_worst10"][0] == pytest.approx(0.05)  # 0.65 vs 0.6: each one's worst image
  assert math.isnan(results.paired_stats.t_interval([0.5])[0])


def test_the_worst_tenth_is_each_models_own_hardest_images_paired_by_resampling():
  stats = results.paired_stats
  assert stats.worst_tenth_mean([0.9] * 18 + [0.5, 0.3]) == pytest.approx(0.4)  # 2 of 20
  assert stats.worst_tenth_mean([0.7, float("nan"), 0.9]) == 0.7  # at least one
  rng = np.random.default_rng(0)
  base = rng.uniform(0.9, 0.99, 200)
  fixed = base.copy()
  hard = np.argsort(base)[:20]
  base[hard] = 0.5  # the baseline fails its hardest tenth; the new model does not
  groups = [(fixed, base)]
  diff, lo, hi = stats.paired_worst_tenth_difference(groups)
  assert diff == pytest.approx(fixed[np.argsort(fixed)[:20]].mean() - 0.5)
  assert 0 < lo <= diff <= hi
  # Mean Dice barely moves; the worst tenth carries the difference.
  assert np.mean(fixed - base) < diff / 5
  same = stats.paired_worst_tenth_difference([(base, base)])
  assert same == (0.0, 0.0, 0.0)
