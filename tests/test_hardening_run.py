"""Hostile but realistic use of training, sweeps, results, evaluate and prepare (issue 22, round
two): checkpoints that do not match the command, bad workdirs and configs, signals, damaged
files. Each test reproduces what a user hit and asserts the new behaviour."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from cxr_jax import errors
from cxr_jax import evaluate
from cxr_jax import report
from cxr_jax import results
from cxr_jax import sweep as sweep_command
from cxr_jax.core.run import checkpoint
from cxr_jax.core.run import rundir
from cxr_jax.core.run.layout import RunDir
from cxr_jax.data import datasets
from cxr_jax.data.records import DataError
from cxr_jax.workflows import sweeps
from cxr_jax.workflows import train
from tests.conftest import REPO_ROOT
from tests.conftest import finished_config
from tests.test_hardening import _prepare
from tests.test_hardening import _tiny_archive
from tests.test_train import read_metrics

# Orbax leaves the other array reads of a failed restore un-awaited (see test_hardening).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _copy(run, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(run, copy)
  return copy


def _config(data_dir, steps=9):
  config = finished_config(data_dir)
  config.num_train_steps = steps
  return config


def _steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# ----- command lines, started together (their start-up is most of their cost) -----


@pytest.fixture(scope="module")
def command_lines(finished_run, data_dir, tmp_path_factory):
  """{name: CompletedProcess-like (returncode, stderr)} of several failing command lines."""
  tmp = tmp_path_factory.mktemp("cli")
  elsewhere = tmp / "elsewhere"  # not the checkout: an sbatch script's directory
  elsewhere.mkdir()
  mismatch = tmp / "mismatch"
  shutil.copytree(finished_run, mismatch)
  record = json.loads((mismatch / "config.json").read_text())
  record["config"]["model"]["base_features"] = 8  # config.json edited after training
  (mismatch / "config.json").write_text(json.dumps(record))
  config = f"--config={REPO_ROOT}/configs/unet.py:smoke"
  main = [sys.executable, "-m", "cxr_jax.main", config, f"--config.data.data_dir={data_dir}"]
  bad = [*main, f"--workdir={tmp / 'bad'}", "--config.num_train_steps=-5"]
  commands = {
    "bad_config": (bad, elsewhere),
    "bad_config_traceback": ([*bad, "--traceback"], elsewhere),
    "no_workdir": (main, REPO_ROOT),
    "mismatch": (
      [
        *main,
        f"--workdir={mismatch}",
        "--config.model.base_features=8",
        "--config.num_train_steps=12",
      ],
      REPO_ROOT,
    ),
    "coordinator": (
      [
        *main,
        f"--workdir={tmp / 'multihost'}",
        f"--coordinator_address=127.0.0.1:{_free_port()}",
        "--num_processes=2",
        "--process_id=1",
        "--init_timeout_s=2",
      ],
      REPO_ROOT,
    ),
  }
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("PYTHONPATH", None)  # from elsewhere only the installed package is importable
  started = {
    name: subprocess.Popen(
      args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for name, (args, cwd) in commands.items()
  }
  done = {}
  for name, proc in started.items():
    _, stderr = proc.communicate(timeout=300)
    done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
  done["mismatch_dir"] = mismatch
  return done


def _last_line(done) -> str:
  return done.stderr.strip().splitlines()[-1]


# ----- 1. restore errors: damage, mismatch, gone -----


@pytest.mark.parametrize("change", ["shape", "ema", "num_workers"])
def test_a_resume_the_checkpoints_do_not_match_is_named_a_mismatch_and_deletes_nothing(
  finished_run, data_dir, tmp_path, change, caplog
):
  workdir = _copy(finished_run, tmp_path)
  config = _config(data_dir, steps=12)
  if change == "shape":  # config.json edited along with the command: no config check sees it
    record = json.loads((workdir / "config.json").read_text())
    record["config"]["model"]["base_features"] = 8
    (workdir / "config.json").write_text(json.dumps(record))
    config.model.base_features = 8
    expected = r"model/params/\S+ has shape \(.*\) in the checkpoint, the command builds \(.*\)"
  elif change == "ema":  # an `ema` item the checkpoints never had (a structural key: schema)
    config.optim.ema_decay = 0.99
    expected = r"config\.optim\.ema_decay is 0\.0 in the run, 0\.99 asked"
  else:  # the grain iterator's state of another pipeline (KeyError: 'exhausted')
    config.data.num_workers = 1
    expected = r"config\.data\.num_workers is 0 in the run, 1 asked"
  with pytest.raises(errors.ConfigError, match=expected) as raised:
    train.train_and_evaluate(config, str(workdir))
  message = str(raised.value)
  assert "delete" not in message.lower() and "\n" not in message
  assert "cannot be read" not in caplog.text and "Delete" not in caplog.text
  assert _steps(workdir) == [3, 6, 9]  # every checkpoint still there


def test_a_checkpoint_rotated_away_while_it_is_read_is_not_called_damage(
  finished_run, tmp_path, monkeypatch, caplog
):
  """predict on a live run keeping max_to_keep checkpoints: the newest goes mid-read."""
  workdir = _copy(finished_run, tmp_path)
  original = checkpoint.restore_model

  def rotated_while_reading(manager, step, *args):
    if step == 9:
      shutil.rmtree(workdir / "checkpoints" / "9")
    return original(manager, step, *args)

  monkeypatch.setattr(checkpoint, "restore_model", rotated_while_reading)
  _, _, step = rundir.restore_model(str(workdir), "latest")
  assert step == 6
  assert "checkpoints/9 was removed while it was read" in caplog.text
  assert "cannot be read" not in caplog.text and "Delete" not in caplog.text


def test_a_mismatched_resume_prints_one_short_message_without_tracebacks(command_lines):
  done = command_lines["mismatch"]
  assert done.returncode == 2, done.stderr[-2000:]
  assert "Traceback" not in done.stderr and "delete" not in done.stderr.lower()
  last = _last_line(done)
  assert f"Checkpoint {command_lines['mismatch_dir']}/checkpoints/9 does not match" in last
  assert "edited after training" in last and "intact" in last
  assert len(done.stderr.splitlines()) < 25  # was 444 lines with 58 tracebacks
  assert _steps(command_lines["mismatch_dir"]) == [3, 6, 9]


# ----- 8. grain workers -----


def test_more_grain_workers_than_cpus_are_capped_with_a_warning(
  finished_run, data_dir, tmp_path, monkeypatch, caplog
):
  """Capped before the pipeline is built: the resume (of a run read with 0 workers) then
  names the capped count, without starting a worker."""
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # a one-CPU allocation
  workdir = _copy(finished_run, tmp_path)
  config = _config(data_dir, steps=12)
  config.data.num_workers = 64
  with pytest.raises(
    errors.ConfigError, match=r"config\.data\.num_workers is 0 in the run, 1 asked"
  ):
    train.train_and_evaluate(config, str(workdir))
  assert "config.data.num_workers=64 is more than the 1 CPU(s) this process may use" in caplog.text


# ----- 10, 16, 25: config paths, workdirs, config errors -----


def test_a_config_file_given_by_absolute_path_loads_from_another_directory(command_lines):
  done = command_lines["bad_config"]
  assert "No module named 'configs'" not in done.stderr
  assert "config.num_train_steps=-5 must be an integer >= 1" in done.stderr  # it was read


def test_a_config_error_is_one_line_with_exit_2_and_the_traceback_a_flag_away(command_lines):
  done = command_lines["bad_config"]
  assert done.returncode == 2 and "Traceback" not in done.stderr
  assert _last_line(done).startswith("main.py: config.num_train_steps=-5 must be an integer")
  assert "set e.g. --config.num_train_steps=1000" in _last_line(done)
  assert "Traceback" in command_lines["bad_config_traceback"].stderr


def test_training_without_a_workdir_is_refused(command_lines):
  done = command_lines["no_workdir"]
  assert done.returncode != 0 and "Flag --workdir must have a value" in done.stderr


@pytest.mark.parametrize("workdir", ["", "folder_of_other_files"])
def test_an_empty_workdir_or_a_folder_that_is_not_a_run_is_refused(data_dir, tmp_path, workdir):
  other = tmp_path / "etc"
  other.mkdir()
  (other / "passwd").write_text("root:x:0:0\n")
  (other / "hosts").write_text("127.0.0.1 localhost\n")
  (tmp_path / "link").symlink_to(other)  # e.g. a symlink to /etc
  path = str(tmp_path / "link") if workdir else ""
  with pytest.raises(errors.ConfigError, match="--workdir"):
    train.train_and_evaluate(_config(data_dir), path)
  assert sorted(os.listdir(other)) == ["hosts", "passwd"]  # nothing written among them
  assert not os.path.exists("checkpoints")  # nor in the current directory


# ----- 17. multi-host start -----


def test_a_coordinator_that_never_answers_is_one_line_not_an_abort(command_lines):
  done = command_lines["coordinator"]
  assert done.returncode == 1 and "Fatal Python error" not in done.stderr
  assert _last_line(done).startswith("jax.distributed: process 1 could not reach 127.0.0.1:")
  assert "is process 0 running" in _last_line(done) and "--init_timeout_s=2" in _last_line(done)


# ----- 11. SIGTERM to a sweep -----


def test_sigterm_to_a_sweep_stops_its_training_which_the_rerun_resumes(data_dir, tmp_path):
  sweep_file = tmp_path / "one_run.py"
  sweep_file.write_text(
    textwrap.dedent(f"""
      from cxr_jax.workflows.sweeps import Sweep

      def get_sweep():
        return Sweep(
            config="{REPO_ROOT}/configs/unet.py:smoke",
            variants={{"unet": {{}}}},
            overrides={{"data.data_dir": "{data_dir}", "num_train_steps": 100000,
                       "eval_every_steps": 100000, "checkpoint_every_steps": 100000}},
            split="validation")
      """)
  )
  root = tmp_path / "sweep"
  command = [sys.executable, "-m", "cxr_jax.sweep", f"--sweep={sweep_file}", f"--root={root}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = root / "unet" / "seed0"
  sweep = subprocess.Popen(
    command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  )
  deadline = time.time() + 240
  while time.time() < deadline and sweep.poll() is None:  # training: a logged step
    if (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text():
      break
    time.sleep(0.2)
  trainer = json.loads(RunDir(str(run)).lock.read_text())["pid"]
  sweep.send_signal(signal.SIGTERM)  # to the sweep alone, as `kill PID` or a job manager does
  _, stderr = sweep.communicate(timeout=120)
  assert sweep.returncode == 143, stderr[-2000:]
  with pytest.raises(ProcessLookupError):
    os.kill(trainer, 0)  # the training stopped too (not orphaned)
  assert not RunDir(str(run)).lock.exists()
  saved = _steps(run)
  assert len(saved) == 1  # the step it was at, saved on the way out

  rerun = subprocess.run(
    [*command, f"--override=num_train_steps={saved[0] + 2}", "--results=false"],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert f"Resumed from step {saved[0]}" in (run / "sweep.log").read_text()
  assert (run / "eval" / "validation.json").exists()


# ----- 15, 18, 19: the run directory -----


def test_resuming_past_num_train_steps_is_refused_and_config_json_kept(
  finished_run, data_dir, tmp_path
):
  workdir = _copy(finished_run, tmp_path)
  before = (workdir / "config.json").read_text()
  with pytest.raises(errors.ConfigError, match=r"step 9, past config.num_train_steps=3"):
    train.train_and_evaluate(_config(data_dir, steps=3), str(workdir))
  assert (workdir / "config.json").read_text() == before


def test_a_garbage_config_json_is_named_by_train_sweep_and_results(
  finished_run, data_dir, tmp_path, capsys
):
  workdir = _copy(finished_run, tmp_path)
  path = workdir / "config.json"
  path.write_text('{"config": {"model": ')  # cut short
  (workdir / "eval").mkdir()
  (workdir / "eval" / "test.json").write_text(json.dumps({"step": 9, "segmentation": {}}))
  (workdir / "eval" / "test.csv").write_text("id,dice\n")
  with pytest.raises(errors.ConfigError, match=f"{path} is not valid JSON"):
    train.train_and_evaluate(_config(data_dir), str(workdir))
  with pytest.raises(errors.ConfigError, match=f"{path} is not valid JSON"):
    sweeps.is_done(RunDir(str(workdir)), "test")
  assert results.read_run(str(workdir), "test") is None  # skipped, named
  assert f"skipping {workdir}: {path} is not valid JSON" in capsys.readouterr().err


def test_metrics_of_a_run_whose_checkpoints_were_deleted_are_set_aside_not_mixed(
  finished_run, data_dir, tmp_path, caplog
):
  workdir = _copy(finished_run, tmp_path)
  old = read_metrics(workdir)
  shutil.rmtree(workdir / "checkpoints")
  train.train_and_evaluate(_config(data_dir), str(workdir))
  steps = [row["step"] for row in read_metrics(workdir) if row["split"] == "train"]
  assert steps == [2, 4, 6, 8, 9]  # each once (were 2,4,6,8,9 twice)
  (aside,) = workdir.glob("metrics.*.orphaned.jsonl")
  assert [json.loads(line) for line in aside.read_text().splitlines()] == old
  assert "has no checkpoint: training starts again from step 0" in caplog.text


# ----- 20. prepared files -----


def test_a_truncated_record_file_is_named_with_prepare_again(data_dir, tmp_path):
  builder = datasets.load_builder("synthetic", data_dir=str(data_dir), synthetic_examples=48)
  copy = tmp_path / "tfds"
  shutil.copytree(data_dir, copy)
  (record_file,) = (copy / os.path.relpath(builder.data_dir, data_dir)).glob("*train.array_record*")
  os.truncate(record_file, record_file.stat().st_size // 2)
  damaged = datasets.load_builder("synthetic", data_dir=str(copy), synthetic_examples=48)
  with pytest.raises(DataError, match=rf"{record_file} cannot be read .*prepare it again"):
    datasets.split_source(damaged, "train")


def test_a_killed_prepares_incomplete_folder_is_removed_by_the_next_prepare(data_dir, tmp_path):
  builder = datasets.load_builder("synthetic", data_dir=str(data_dir), synthetic_examples=48)
  copy = tmp_path / "tfds"
  shutil.copytree(data_dir, copy)
  version_dir = copy / os.path.relpath(builder.data_dir, data_dir)
  leftover = version_dir.parent / f"incomplete.ABC123_{version_dir.name}"
  leftover.mkdir()
  (leftover / "cxr_masks_and_labels-train.array_record-00000-of-00001").write_bytes(b"\0" * 1000)
  datasets.load_builder("synthetic", data_dir=str(copy), synthetic_examples=48)
  assert not leftover.exists() and version_dir.exists()


# ----- 21. sweeps -----


@pytest.mark.parametrize("name", ["../../escaped", "a/b", ".hidden", ""])
def test_sweep_variant_names_that_are_not_one_folder_are_refused(name):
  with pytest.raises(errors.ConfigError, match="is not a plain folder name"):
    sweeps.expand(sweeps.Sweep(config="c.py", variants={"ok": {}, name: {}}))


def test_one_runs_garbage_config_json_fails_that_run_only(finished_run, tmp_path, capsys):
  root = tmp_path / "root"
  run = sweeps.Run("v", 0, None, {})
  shutil.copytree(finished_run, root / run.name)
  (root / run.name / "config.json").write_text("\0\0\0")
  sweep = sweeps.Sweep(config="c.py", variants={"v": {}})
  assert not sweep_command._done(sweeps.run_dir(str(root), run), "test")  # the sweep goes on
  assert sweep_command.run_one(sweep, "s.py", run, str(root)) == (run.name, 2)
  assert f"sweep: v/seed0: {root / run.name}/config.json is not valid JSON" in (
    capsys.readouterr().err
  )


# ----- 22. results -----


def _fake_run(path, *, variant, dataset, task, dice, step=100, steps=100, fold=None):
  (path / "eval").mkdir(parents=True)
  (path / "checkpoints" / str(step)).mkdir(parents=True)  # trained to `step`, evaluated there
  (path / "sweep.json").write_text(json.dumps({"variant": variant, "seed": 0, "fold": fold}))
  config = {"num_train_steps": steps, "data": {"name": dataset, "split": "hash"}}
  (path / "config.json").write_text(
    json.dumps({"config": config, "dataset": {"name": f"cxr_masks_and_labels/{dataset}/1.1.0"}})
  )
  summary = {"step": step, "num_images": 3}
  if task == "segmentation":
    summary["segmentation"] = {
      "raw": {"all": {m: {"mean": float(np.mean(dice))} for m in ("dice", "hd95_px", "asd_px")}}
    }
  else:
    summary["classification"] = {"auc": 0.8, "accuracy": 0.7}
  (path / "eval" / "test.json").write_text(json.dumps(summary))
  rows = "".join(f"img{k},0,{d},0.5\n" for k, d in enumerate(dice))
  (path / "eval" / "test.csv").write_text("id,label,dice,p_abnormal\n" + rows)


def test_results_compare_within_a_dataset_and_task_and_mark_unfinished_runs(tmp_path, capsys):
  runs = {
    "kaggle_base": dict(variant="base", dataset="kaggle", task="segmentation", dice=[0.9] * 3),
    "kaggle_new": dict(variant="new", dataset="kaggle", task="segmentation", dice=[0.95] * 3),
    "phantom": dict(variant="phantom", dataset="synthetic", task="segmentation", dice=[0.99] * 3),
    "classifier": dict(variant="cls", dataset="kaggle", task="classification", dice=[]),
    "stopped": dict(
      variant="new", dataset="kaggle", task="segmentation", dice=[0.1] * 3, step=140, steps=3000
    ),
  }
  for name, spec in runs.items():
    _fake_run(tmp_path / name, **spec)
  cut = tmp_path / "cut"
  _fake_run(cut, variant="base", dataset="kaggle", task="segmentation", dice=[0.9] * 3)
  (cut / "eval" / "test.json").write_text('{"step": 100, "segmen')
  paths = results.write_results(
    str(tmp_path / "out"), [str(tmp_path / n) for n in [*runs, "cut"]], baseline="base"
  )
  markdown = open(paths[1]).read()
  sections = markdown.split("## ")[1:]
  assert len(sections) == 3  # kaggle segmentation, kaggle classification, synthetic
  kaggle = next(s for s in sections if s.startswith("cxr_masks_and_labels/kaggle/1.1.0 hash seg"))
  assert "| base | 1 |" in kaggle and "| new | 1 | 0.9500" in kaggle  # not the stopped run
  assert "dice +0.0500" in kaggle
  synthetic = next(s for s in sections if "synthetic" in s.splitlines()[0])
  (row,) = [line for line in synthetic.splitlines() if line.startswith("| phantom |")]
  assert row.startswith("| phantom | 1 | 0.9900 +- - [-, -]") and row.endswith("| baseline |")
  assert f"- {tmp_path / 'stopped'}: trained to step 140 of 3000" in markdown
  assert f"skipping {cut}" in capsys.readouterr().err
  rows = open(paths[0]).read()
  assert "group" in rows.splitlines()[0] and "False" in rows


# ----- 23. prepare: mask foreground -----


def test_prepare_reports_mask_foreground_and_flags_inverted_masks(tmp_path, capsys):
  from tests.test_dataset import _png

  files = {}
  for i in range(1, 13):
    lungs = np.zeros((32, 32), np.uint8)
    lungs[8:24, 4:14] = lungs[8:24, 18:28] = 255  # 31% of the image
    image_id = f"{'MCUCXR' if i % 2 else 'CHNCXR'}_{i:04d}_{i % 2}"
    files[f"{image_id}.png"] = np.full((32, 32), 90 + i, np.uint8)
    mask_name = f"{image_id}.png" if i % 2 else f"{image_id}_mask.png"
    files[mask_name, "mask"] = 255 - lungs if image_id.startswith("CHN") else lungs  # inverted
  archive = tmp_path / "archive"
  _tiny_archive(archive, {k: v for k, v in files.items() if isinstance(k, str)})
  (archive / "Lung Segmentation" / "masks").mkdir()
  for (name, _), mask in ((k, v) for k, v in files.items() if isinstance(k, tuple)):
    (archive / "Lung Segmentation" / "masks" / name).write_bytes(_png(mask))
  out = _prepare(capsys, dataset="kaggle", manual_dir=str(archive), data_dir=str(tmp_path / "tfds"))
  assert "mask foreground (mean fraction of the image): montgomery 0.312, shenzhen 0.688" in out
  assert "masks outside 0.05-0.6: 6" in out
  assert "WARNING: the shenzhen masks cover 69% of their images on average" in out
  assert "montgomery masks cover" not in out


# ----- 24. evaluate's outputs -----


def test_evaluate_replaces_its_outputs_whole_and_every_row_names_its_step(
  finished_run, tmp_path, monkeypatch
):
  workdir = _copy(finished_run, tmp_path)
  summary = evaluate.run(str(workdir), "validation", checkpoint="latest", show_progress=False)
  out = workdir / "eval"
  written = {p.name: p.read_bytes() for p in out.iterdir()}
  lines = (out / "validation.csv").read_text().splitlines()
  assert lines[0].startswith("id,step,") and all(",9," in line for line in lines[1:])
  assert summary["step"] == json.loads((out / "validation.json").read_text())["step"] == 9
  assert "(step 9)" in (out / "validation_report.html").read_text()

  def killed(*args, **kwargs):  # evaluate stopped part-way through writing step 6's outputs
    raise KeyboardInterrupt

  monkeypatch.setattr(report, "write_report", killed)
  with pytest.raises(KeyboardInterrupt):
    evaluate.run(str(workdir), "validation", checkpoint=6, show_progress=False)
  assert {p.name: p.read_bytes() for p in out.iterdir()} == written  # step 9's, all of them
