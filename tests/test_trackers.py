"""Experiment trackers: a real `mlflow server` on localhost (SQLite store) followed through a
run, its resume and evaluate; Weights & Biases offline, its run files read back."""

import glob
import json
import socket
import struct
import subprocess
import sys
import time
import urllib.request

import ml_collections
import mlflow
import pytest
from wandb.proto import wandb_internal_pb2

from configs import default
from cxr_jax import evaluate
from cxr_jax.config import schema
from cxr_jax.core.run import trackers
from cxr_jax.core.run.layout import RunDir
from cxr_jax.workflows import train
from tests.test_train import smoke_config


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
  """`mlflow server` on 127.0.0.1 with its SQLite backend store, stopped after the module."""
  root = tmp_path_factory.mktemp("mlflow")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
  command += ["--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db"]
  command += ["--artifacts-destination", str(root / "artifacts")]
  log = open(root / "server.log", "w")
  server = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT)
  uri, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
  try:
    while True:
      try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
          if answer.status == 200:
            break
      except OSError:
        pass
      if server.poll() is not None or time.monotonic() > deadline:
        pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
      time.sleep(0.5)
    yield uri
  finally:
    server.terminate()
    try:
      server.wait(timeout=20)
    except subprocess.TimeoutExpired:
      server.kill()
      server.wait()
    log.close()


def test_mlflow_follows_a_run_its_resume_and_its_evaluation(mlflow_server, tmp_path):
  config = smoke_config("unet", tmp_path / "tfds")
  config.tracker, config.tracker_uri, config.tracker_project = "mlflow", mlflow_server, "lungs"
  config.optim.schedule = (
    "constant"  # num_train_steps out of the step: the resume reuses its compile
  )
  workdir = tmp_path / "run"
  config.num_train_steps = 3
  train.train_and_evaluate(config, str(workdir))
  first = json.loads((workdir / RunDir.TRACKER).read_text())["mlflow"]
  config.num_train_steps = 6  # the same command, longer: resumes from step 3
  train.train_and_evaluate(config, str(workdir))
  evaluate.run(str(workdir), "test", show_progress=False)

  record = json.loads((workdir / RunDir.TRACKER).read_text())["mlflow"]
  assert record == first and record["tracking_uri"] == mlflow_server
  client = mlflow.MlflowClient(tracking_uri=mlflow_server)
  experiment = client.get_experiment_by_name("lungs")
  runs = client.search_runs([experiment.experiment_id])
  assert [r.info.run_id for r in runs] == [record["run_id"]]  # one run, continued
  run = runs[0]
  assert run.info.status == "FINISHED" and run.info.run_name == "run"
  assert run.data.params["model.name"] == "unet" and run.data.params["batch_size"] == "4"
  loss = client.get_metric_history(record["run_id"], "train/loss")
  assert sorted(m.step for m in loss) == [2, 3, 4, 6]  # smoke: every 2 steps, and the last
  dice = client.get_metric_history(record["run_id"], "validation/dice")
  assert sorted(m.step for m in dice) == [3, 6] and all(0 <= m.value <= 1 for m in dice)
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  logged = {m["step"]: m["dice"] for m in metrics if m["split"] == "validation"}
  assert {m.step: m.value for m in dice} == pytest.approx(logged)
  stored = {a.path for a in client.list_artifacts(record["run_id"], "eval")}
  assert stored == {"eval/test.json", "eval/test.csv", "eval/test_report.html"}
  report = client.download_artifacts(record["run_id"], "eval/test.json", str(tmp_path))
  assert json.loads(open(report).read())["step"] == 6


def _wandb_records(path: str) -> list:
  """The records of a W&B run file: ':W&B' header, then LevelDB-log records in 32 KiB
  blocks (crc, length, type: 1 full, 2 first, 3 middle, 4 last), each a protobuf Record."""
  data = open(path, "rb").read()
  assert data[:4] == b":W&B"
  pos, records, pending = 7, [], b""
  while pos + 7 <= len(data):
    if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
      pos += 32768 - pos % 32768
      continue
    _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
    if kind == 0 and length == 0:
      break
    pending += data[pos + 7 : pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      records.append(record)
      pending = b""
  return records


def _exited(path: str) -> bool:
  try:
    records = _wandb_records(path)
  except Exception:  # noqa: BLE001  (a record still being written)
    return False
  return bool(records) and records[-1].HasField("exit")


def test_wandb_offline_keeps_one_run_id_across_a_resume(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  config = ml_collections.ConfigDict({"tracker": "wandb", "tracker_project": "lungs"})
  workdir = str(tmp_path / "run")
  (tmp_path / "run").mkdir()
  writer = trackers.open_tracker(workdir, config)
  writer.write_hparams({"model": {"name": "unet"}, "batch_size": 4})
  writer.write_scalars(2, {"train/loss": 1.5})
  writer.write_scalars(4, {"train/loss": 1.25, "validation/dice": 0.5})
  writer.close()
  resumed = trackers.open_tracker(workdir, config)  # as the resumed run opens it
  resumed.write_scalars(6, {"train/loss": 1.0})
  resumed.close()

  run_id = json.loads((tmp_path / "run" / RunDir.TRACKER).read_text())["wandb"]["run_id"]
  files = sorted(glob.glob(f"{workdir}/wandb/offline-run-*/run-*.wandb"))
  assert len(files) == 2 and all(f.endswith(f"run-{run_id}.wandb") for f in files)
  # wandb's service process may still be writing a file when finish() returns: its last
  # record is the run's exit.
  deadline = time.monotonic() + 60
  while not all(_exited(f) for f in files):
    assert time.monotonic() < deadline, "W&B never wrote the runs' exit records"
    time.sleep(0.2)
  history, config_items = [], {}
  for file in files:
    for record in _wandb_records(file):
      if record.HasField("run"):
        assert (record.run.run_id, record.run.project) == (run_id, "lungs")
      if record.HasField("history"):
        items = {
          i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item
        }
        history.append({k: v for k, v in items.items() if not k.startswith("_") or k == "_step"})
      if record.HasField("config"):
        config_items.update(
          {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.config.update}
        )
  assert history == [
    {"_step": 2, "train/loss": 1.5},
    {"_step": 4, "train/loss": 1.25, "validation/dice": 0.5},
    {"_step": 6, "train/loss": 1.0},
  ]
  assert config_items["model.name"] == "unet" and config_items["batch_size"] == "4"


def test_an_unknown_tracker_is_refused_at_start_up():
  config = default.get_config()
  trackers.check_config(config)  # off by default: nothing imported
  config.tracker = "neptune"
  with pytest.raises(schema.ConfigError, match=r"config.tracker='neptune' must be one of"):
    schema.validate(config)
