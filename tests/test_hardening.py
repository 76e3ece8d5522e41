"""Hostile but realistic use: damaged checkpoints, two runs on one directory, bad paths and
numbers. Each test reproduces a failure a user hit and asserts the new behaviour."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cxr_jax import evaluate
from cxr_jax.config import schema
from cxr_jax.core.run import run_lock
from cxr_jax.core.run import rundir
from cxr_jax.core.run.layout import RunDir
from cxr_jax.workflows import train
from tests.conftest import REPO_ROOT
from tests.conftest import finished_config
from tests.conftest import run_module
from tests.conftest import smoke_command
from tests.test_train import read_metrics
from tests.test_train import smoke_config

# Orbax leaves the other array reads of a failed restore un-awaited; Python reports each
# coroutine when it is collected. That is the damaged checkpoint these tests make.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _copy(run, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(run, copy)
  return copy


def _truncate_array_files(step_dir, keep=0.5):
  """Cuts every data file of the checkpoint's parameters to `keep` of its size, as a copy or
  write that stopped part way would. (Cutting only the largest file was not always enough:
  in one CI run that step still restored.)"""
  files = [p for p in (step_dir / "model").rglob("*") if p.is_file() and "/d/" in str(p)]
  assert files
  for path in files:
    os.truncate(path, int(path.stat().st_size * keep))


@pytest.mark.parametrize("damage", ["array", "metadata"])
def test_a_damaged_newest_checkpoint_is_named_and_skipped(
  finished_run, data_dir, tmp_path, damage, caplog
):
  run, config = finished_run, finished_config(data_dir)
  workdir = _copy(run, tmp_path)
  newest = workdir / "checkpoints" / "9"
  if damage == "array":
    _truncate_array_files(newest)
  else:
    os.truncate(newest / "model" / "_METADATA", 100)

  # Inference falls back to the newest readable checkpoint, and says which it used.
  _, _, step = rundir.restore_model(str(workdir), "latest")
  assert step == 6
  assert f"{newest} cannot be read" in caplog.text

  # Training resumes from it, deletes the unreadable one (Orbax would skip every save up to
  # its step) and saves that step again, readable.
  train.train_and_evaluate(config, str(workdir))
  _, _, step = rundir.restore_model(str(workdir), "latest")
  assert step == 9


def test_evaluate_records_the_step_it_restored(finished_run, tmp_path):
  run = finished_run
  workdir = _copy(run, tmp_path)
  _truncate_array_files(workdir / "checkpoints" / "9", keep=0)
  summary = evaluate.run(str(workdir), "validation", checkpoint="latest", show_progress=False)
  assert summary["step"] == 6


def test_a_second_run_on_a_directory_in_use_is_refused(finished_run, data_dir, tmp_path):
  run, config = finished_run, finished_config(data_dir)
  workdir = _copy(run, tmp_path)
  before = read_metrics(workdir)
  with run_lock.RunLock(str(workdir)):  # a live run: this process, on this host
    config.num_train_steps = 12
    with pytest.raises(RuntimeError, match=rf"in use by another run \(pid {os.getpid()}"):
      train.train_and_evaluate(config, str(workdir))
  assert read_metrics(workdir) == before  # nothing written by the refused run
  assert not (workdir / RunDir.LOCK).exists()  # released by its holder


def test_a_killed_runs_lock_does_not_block(data_dir, tmp_path):
  """kill -9 leaves run.lock behind; the next run on this host sees its pid is gone."""
  workdir = tmp_path / "run"
  args = smoke_command(
    workdir,
    data_dir,
    "--config.num_train_steps=100000",
  )
  proc = subprocess.Popen(
    args,
    cwd=REPO_ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  lock = workdir / RunDir.LOCK
  deadline = time.time() + 240
  # Its record written (the file is created empty, then written).
  while not (lock.exists() and lock.read_text()) and time.time() < deadline:
    assert proc.poll() is None
    time.sleep(0.2)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert json.loads(lock.read_text())["pid"] == proc.pid
  config = smoke_config("unet", data_dir)
  train.train_and_evaluate(config, str(workdir))
  assert not lock.exists()


def test_a_lock_taken_over_is_not_removed_by_its_former_holder(tmp_path):
  lock = tmp_path / RunDir.LOCK
  first = run_lock.RunLock(str(tmp_path))
  first.acquire()
  lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0, "token": "other"}))
  first.release()  # not its lock any more: left for its new holder
  assert json.loads(lock.read_text())["token"] == "other"


def test_a_stale_lock_from_another_host_is_taken_over(tmp_path):
  lock = tmp_path / RunDir.LOCK
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
      schema.validate(importlib.import_module(f"configs.{name}").get_config(variant))


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


# ----- hostile names and sizes -----


def test_csv_cells_that_a_spreadsheet_would_run_stay_text(tmp_path):
  import csv

  from cxr_jax.core.run import csv_tables

  rows = [
    {"image": '=HYPERLINK("http://x").png', "value": -0.5, "note": "+1"},
    {"image": "@SUM(A1).png", "value": float("nan"), "note": "-x"},
  ]
  csv_tables.write_csv(tmp_path / "t.csv", ["image", "value", "note"], rows)
  with open(tmp_path / "t.csv") as f:
    got = list(csv.DictReader(f))
  assert [r["image"] for r in got] == ['\'=HYPERLINK("http://x").png', "'@SUM(A1).png"]
  assert [r["value"] for r in got] == ["-0.5", ""]  # numbers stay numbers
  assert [r["note"] for r in got] == ["+1", "'-x"]


def test_predict_writes_a_formula_file_name_as_text(tmp_path, fake_model):
  import csv

  from PIL import Image

  from cxr_jax import predict
  from tests.test_predict import _config

  name = "=HYPERLINK(1).png"
  Image.fromarray(np.full((40, 30), 200, np.uint8)).save(tmp_path / name)
  out = tmp_path / "out"
  assert (
    predict.run_model(_config(), fake_model(), str(tmp_path / name), str(out), show_progress=False)
    == 0
  )
  with open(out / "predictions.csv") as f:
    assert next(csv.DictReader(f))["image"] == "'" + name


def test_an_oversized_zip_member_is_skipped_without_reading_it(tmp_path, monkeypatch):
  import zipfile

  from cxr_jax.data import datasets
  from cxr_jax.data import kaggle_archive
  from tests.test_dataset import _png

  archive = tmp_path / "archive.zip"
  with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("Lung Segmentation/CXR_png/CHNCXR_0001_0.png", _png(np.zeros((8, 8), np.uint8)))
    z.writestr("Lung Segmentation/CXR_png/CHNCXR_0002_1.png", b"\0" * (3 * 2**20))  # a bomb
  monkeypatch.setattr(kaggle_archive, "MAX_FILE_BYTES", 2**20)
  builder = datasets.load_builder(
    "kaggle", data_dir=str(tmp_path / "tfds"), manual_dir=str(archive)
  )
  skipped = builder.info.metadata["skipped"]
  assert len(skipped) == 1 and "CHNCXR_0002_1.png: unreadable image (3 MiB, over" in skipped[0]


def test_ids_take_ascii_digits_only():
  from cxr_jax.data import kaggle_archive

  assert kaggle_archive._ID_PATTERN.fullmatch("CHNCXR_0904_0")
  assert not kaggle_archive._ID_PATTERN.fullmatch("CHNCXR_\u0660\u0669\u0660\u0664_0")
  assert not kaggle_archive._ID_PATTERN.fullmatch("CHNCXR_0904_0\n")


def test_the_tpu_launcher_passes_paths_through_quoted(tmp_path):
  stub = tmp_path / "bin"
  stub.mkdir()
  (stub / "gcloud").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "${@: -1}"\n')
  (stub / "gcloud").chmod(0o755)
  workdir, data_dir = "/runs/a b;touch pwned", "/data/$(id)"
  env = {
    **os.environ,
    "PATH": f"{stub}:{os.environ['PATH']}",
    "TPU": "t",
    "ZONE": "z",
    "WORKDIR": workdir,
    "DATA_DIR": data_dir,
  }
  remote = subprocess.run(
    ["bash", str(REPO_ROOT / "launch" / "tpu_vm.sh"), "--config.seed=3"],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  train_command = remote.rsplit(" && ", 1)[1]  # what each worker runs after cd and pip
  printed = subprocess.run(
    ["bash", "-c", 'python() { printf "%s\\n" "$@"; }; ' + train_command],
    capture_output=True,
    text=True,
    check=True,
    cwd=tmp_path,
  ).stdout
  assert f"--workdir={workdir}" in printed.splitlines()
  assert f"--config.data.data_dir={data_dir}" in printed.splitlines()
  assert "--config.seed=3" in printed.splitlines() and not (tmp_path / "pwned").exists()


# ----- prepare: unusable splits, another archive, a misspelt one -----


def _tiny_archive(root, files):
  from tests.test_dataset import _png

  tree = root / "Lung Segmentation" / "CXR_png"
  tree.mkdir(parents=True)
  for name, data in files.items():
    (tree / name).write_bytes(data if isinstance(data, bytes) else _png(data))
  return root


def _prepare(capsys, **flag_values):
  from absl import flags
  from absl.testing import flagsaver

  from cxr_jax.data import prepare

  if "dataset" not in flags.FLAGS:
    prepare.define_flags()
  with flagsaver.flagsaver(**flag_values):
    prepare.main(["prepare"])
  return capsys.readouterr().out


def test_prepare_finishes_when_every_image_of_a_split_is_unreadable(tmp_path, capsys):
  from cxr_jax.data import splits

  ids = [f"CHNCXR_{i:04d}_{i % 2}" for i in range(1, 40)]
  test_ids = [i for i in ids if splits.split_of(i) == "test"]
  files = {f"{i}.png": np.full((16, 16), 100 + k, np.uint8) for k, i in enumerate(ids)}
  for image_id in test_ids:
    files[f"{image_id}.png"] = b""  # zero bytes
  archive = _tiny_archive(tmp_path / "archive", files)
  out = _prepare(capsys, dataset="kaggle", manual_dir=str(archive), data_dir=str(tmp_path / "tfds"))
  assert "EMPTY splits: test" in out
  lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
  assert lines["test"][1] == "0" and int(lines["all"][1]) == len(ids) - len(test_ids)
  assert f"skipped files: {len(test_ids)}" in out


def test_prepare_says_when_the_data_dir_holds_another_archive(tmp_path, capsys):
  first = _tiny_archive(
    tmp_path / "first",
    {f"CHNCXR_{i:04d}_0.png": np.full((16, 16), i, np.uint8) for i in range(1, 30)},
  )
  data_dir = str(tmp_path / "tfds")
  out = _prepare(capsys, dataset="kaggle", manual_dir=str(first), data_dir=data_dir)
  assert f"built from {first}" in out and "WARNING" not in out
  for other in (tmp_path / "second", tmp_path / "missing"):
    if other.name == "second":
      _tiny_archive(other, {"CHNCXR_0001_1.png": np.zeros((16, 16), np.uint8)})
    out = _prepare(capsys, dataset="kaggle", manual_dir=str(other), data_dir=data_dir)
    assert f"WARNING: not rebuilt from --manual_dir={other}" in out
    assert f"built from {first}" in out


def test_auto_with_a_misspelt_manual_dir_stops(tmp_path, monkeypatch):
  import ml_collections

  from cxr_jax.data import datasets
  from cxr_jax.data.records import DataError

  monkeypatch.delenv(datasets.MANUAL_DIR_ENV, raising=False)
  config = ml_collections.ConfigDict({"name": "auto", "manual_dir": str(tmp_path / "archvie")})
  with pytest.raises(DataError, match="does not exist .a typo.."):
    datasets.resolve_name(config)


# ----- messages -----


def test_a_resume_with_a_structural_key_changed_is_one_line_naming_each(
  finished_run, data_dir, tmp_path
):
  """ema_decay and num_workers shape the checkpoint and the data iterator (they once failed
  deep in Orbax or grain); grad_clip's on/off the optimiser state. Refused before any
  restore, in one line, exit 2, and nothing of the run is touched."""
  run = finished_run
  workdir = _copy(run, tmp_path)
  before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  done = run_module(
    "cxr_jax.main",
    f"--config={REPO_ROOT}/configs/unet.py:smoke",
    f"--workdir={workdir}",
    f"--config.data.data_dir={data_dir}",
    "--config.optim.ema_decay=0.9",
    "--config.data.num_workers=1",
    "--config.optim.grad_clip=0.0",
  )
  last = done.stderr.strip().splitlines()[-1]
  assert done.returncode == 2, done.stderr[-2000:]
  assert "Traceback" not in done.stderr
  assert last == (
    f"main.py: cannot resume {workdir}: config.data.num_workers is 0 in the run, 1 asked; "
    "config.optim.grad_clip is 1.0 in the run, 0.0 asked; config.optim.ema_decay is 0.0 in "
    "the run, 0.9 asked (it shapes the checkpoint or the data iterator); resume with the "
    "run's value, or train into another --workdir."
  )
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


def test_a_misspelt_config_key_is_one_line_not_tracebacks(tmp_path):
  done = run_module(
    "cxr_jax.main",
    f"--config={REPO_ROOT}/configs/unet.py:smoke",
    f"--workdir={tmp_path}",
    "--config.modle.name=unet",
  )
  assert done.returncode == 2
  assert "unknown config key 'modle' Did you mean \"model\"" in done.stderr
  assert "Traceback" not in done.stderr


def test_an_unwritable_workdir_is_one_line_and_the_traceback_a_flag_away(tmp_path, data_dir):
  blocker = tmp_path / "file"
  blocker.write_text("")
  args = (
    "cxr_jax.main",
    f"--config={REPO_ROOT}/configs/unet.py:smoke",
    f"--workdir={blocker}/run",
    f"--config.data.data_dir={data_dir}",
  )
  done = run_module(*args)
  assert done.returncode == 1 and "Traceback" not in done.stderr
  assert f"cannot write {blocker}/run: Not a directory" in done.stderr
  assert "Traceback" in run_module(*args, "--traceback").stderr


def test_predict_output_that_is_a_file(tmp_path):
  (tmp_path / "out").write_text("")
  done = run_module(
    "cxr_jax.predict",
    f"--workdir={tmp_path}",
    f"--input={tmp_path}",
    f"--output={tmp_path / 'out'}",
  )
  assert done.returncode == 2 and "is a file; give a folder" in done.stderr


@contextlib.contextmanager
def _tmpfs(path, options: str):
  """A small tmpfs mounted at `path` (full or read-only disks on demand); skips without it."""
  path.mkdir()
  mounted = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
  )
  if mounted.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", str(path)], check=False)


def test_a_full_disk_ends_with_one_line_that_says_so(tmp_path, data_dir):
  with _tmpfs(tmp_path / "full", "size=2m") as full:  # smaller than the checkpoints
    done = run_module(
      "cxr_jax.main",
      f"--config={REPO_ROOT}/configs/unet.py:smoke",
      f"--workdir={full}/run",
      f"--config.data.data_dir={data_dir}",
      "--config.model.base_features=16",
    )
  assert done.returncode == 1
  last = done.stderr.strip().splitlines()[-1]
  assert "the disk is full" in last and "rerun" in last, done.stderr[-2000:]


def test_a_read_only_workdir_is_one_line(tmp_path, data_dir):
  with _tmpfs(tmp_path / "ro", "ro,size=1m") as read_only:
    done = run_module(
      "cxr_jax.main",
      f"--config={REPO_ROOT}/configs/unet.py:smoke",
      f"--workdir={read_only}/run",
      f"--config.data.data_dir={data_dir}",
    )
  assert done.returncode == 1 and "Traceback" not in done.stderr
  assert f"cannot write {read_only}/run: Read-only file system" in done.stderr
