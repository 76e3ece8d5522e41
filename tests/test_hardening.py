"""Hostile but realistic use: damaged checkpoints, two runs on one directory, bad paths and
numbers. Each test reproduces a failure a user hit and asserts the new behaviour."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from cxr_jax import evaluate
from cxr_jax.core import config_checks
from cxr_jax.core import run_lock
from cxr_jax.core import rundir
from cxr_jax.workflows import train
from tests.conftest import REPO_ROOT
from tests.test_train import read_metrics
from tests.test_train import smoke_config

# Orbax leaves the other array reads of a failed restore un-awaited; Python reports each
# coroutine when it is collected. That is the damaged checkpoint these tests make.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
  """A smoke run with checkpoints at steps 3, 6 and 9 (read-only: tests copy it)."""
  config = smoke_config("unet", data_dir)
  config.num_train_steps = 9
  config.max_to_keep = 3
  workdir = tmp_path_factory.mktemp("runs") / "run"
  train.train_and_evaluate(config, str(workdir))
  return workdir, config


def _copy(run, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(run, copy)
  return copy


def _largest_array_file(step_dir):
  files = [p for p in (step_dir / "model").rglob("*") if p.is_file() and "/d/" in str(p)]
  return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["array", "metadata"])
def test_a_damaged_newest_checkpoint_is_named_and_skipped(finished_run, tmp_path, damage, caplog):
  run, config = finished_run
  workdir = _copy(run, tmp_path)
  newest = workdir / "checkpoints" / "9"
  if damage == "array":
    path = _largest_array_file(newest)
    os.truncate(path, 8000 if path.stat().st_size > 8000 else 1)
  else:
    os.truncate(newest / "model" / "_METADATA", 100)

  # Inference falls back to the newest readable checkpoint, and says which it used.
  _, _, step = rundir.restore_model(str(workdir), "latest")
  assert step == 6
  assert f"{newest} cannot be read" in caplog.text

  # Training resumes from it and trains past the damage.
  config.num_train_steps = 12
  train.train_and_evaluate(config, str(workdir))
  _, _, step = rundir.restore_model(str(workdir), "latest")
  assert step == 12


def test_evaluate_records_the_step_it_restored(finished_run, tmp_path):
  run, _ = finished_run
  workdir = _copy(run, tmp_path)
  os.truncate(_largest_array_file(workdir / "checkpoints" / "9"), 1)
  summary = evaluate.run(str(workdir), "validation", checkpoint="latest", progress=False)
  assert summary["step"] == 6


def test_a_second_run_on_a_directory_in_use_is_refused(finished_run, tmp_path):
  run, config = finished_run
  workdir = _copy(run, tmp_path)
  before = read_metrics(workdir)
  with run_lock.RunLock(str(workdir)):  # a live run: this process, on this host
    config.num_train_steps = 12
    with pytest.raises(RuntimeError, match=rf"in use by another run \(pid {os.getpid()}"):
      train.train_and_evaluate(config, str(workdir))
  assert read_metrics(workdir) == before  # nothing written by the refused run
  assert not (workdir / run_lock.LOCK_FILE).exists()  # released by its holder


def test_a_killed_runs_lock_does_not_block(data_dir, tmp_path):
  """kill -9 leaves run.lock behind; the next run on this host sees its pid is gone."""
  workdir = tmp_path / "run"
  args = [
    sys.executable,
    "-m",
    "cxr_jax.main",
    f"--config={REPO_ROOT}/configs/unet.py:smoke",
    f"--workdir={workdir}",
    f"--config.data.data_dir={data_dir}",
    "--config.num_train_steps=100000",
  ]
  proc = subprocess.Popen(
    args,
    cwd=REPO_ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  lock = workdir / run_lock.LOCK_FILE
  deadline = time.time() + 240
  while not lock.exists() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.2)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert json.loads(lock.read_text())["pid"] == proc.pid
  config = smoke_config("unet", data_dir)
  train.train_and_evaluate(config, str(workdir))
  assert not lock.exists()


def test_a_stale_lock_from_another_host_is_taken_over(tmp_path):
  lock = tmp_path / run_lock.LOCK_FILE
  lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0}))
  with pytest.raises(RuntimeError, match="'elsewhere'"):  # fresh: that host may be running
    run_lock.RunLock(str(tmp_path)).acquire()
  old = time.time() - run_lock.LOCK_STALE_S - 1
  os.utime(lock, (old, old))
  with run_lock.RunLock(str(tmp_path)) as taken:
    assert json.loads(lock.read_text())["host"] == socket.gethostname()
    assert taken.path == str(lock)


def test_a_backslash_in_the_workdir_is_refused_before_anything_is_written(data_dir, tmp_path):
  workdir = tmp_path / "runs" / "x\\y"
  with pytest.raises(ValueError, match="backslash"):
    train.train_and_evaluate(smoke_config("unet", data_dir), str(workdir))
  assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("num_train_steps", -5, r"config.num_train_steps=-5 must be an integer >= 1"),
    ("optim.learning_rate", -1.0, r"config.optim.learning_rate=-1.0 must be > 0"),
    ("eval_every_steps", 0, r"config.eval_every_steps=0 must be an integer >= 1"),
    ("model.dropout", 1.0, r"config.model.dropout=1.0 must be \[0, 1\)"),
    ("optim.learning_rate", float("nan"), r"learning_rate=nan must be > 0"),
  ],
)
def test_senseless_numbers_fail_at_start_up_naming_key_and_value(
  data_dir, tmp_path, key, value, message
):
  config = smoke_config("unet", data_dir)
  node = config
  *parents, leaf = key.split(".")
  for part in parents:
    node = node[part]
  node[leaf] = value
  with pytest.raises(ValueError, match=message + r".*set e\.g\. --config\." + key):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_every_default_config_passes_its_checks():
  import importlib

  for name in ("unet", "attention_unet", "classifier", "multitask", "lung_crop_classifier"):
    for variant in (None, "smoke"):
      config_checks.check_training_config(
        importlib.import_module(f"configs.{name}").get_config(variant)
      )


def test_predict_refuses_a_negative_batch_size(tmp_path):
  done = subprocess.run(
    [
      sys.executable,
      "-m",
      "cxr_jax.predict",
      f"--workdir={tmp_path}",
      f"--input={tmp_path}",
      f"--output={tmp_path / 'out'}",
      "--batch_size=-1",
    ],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=REPO_ROOT,
  )
  assert done.returncode != 0
  assert "--batch_size=-1" in done.stderr and "non-negative" in done.stderr
  assert not (tmp_path / "out").exists()
