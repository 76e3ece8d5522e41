"""Run and data directories in a bucket, over the real Cloud Storage protocol.

`gcp-storage-emulator` (tests/gcs_emulator.py adds a header it leaves out) serves the GCS
JSON API on localhost; gcsfs (behind etils.epath) finds it through STORAGE_EMULATOR_HOST and
TensorStore (behind Orbax) through TENSORSTORE_GCS_HTTP_URL. Every command runs in an empty
working directory, which must stay empty.
"""

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from cxr_jax.core.run import rundir
from tests.conftest import KILL_AFTER_SECOND_SAVE
from tests.conftest import REPO_ROOT
from tests.conftest import run_command
from tests.conftest import smoke_command

BUCKET = "cxr-test"
# gcsfs asks a gRPC control API for the bucket's layout (60 s timeouts against an emulator);
# read when gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """A GCS emulator with one bucket; the environment that points gcsfs and TensorStore at it."""
  try:
    import gcp_storage_emulator  # noqa: F401
    import gcsfs
  except ImportError as e:
    pytest.skip(f"the GCS emulator cannot be used here ({e}): pip install '.[test]'")
  port = _free_port()
  log = open(tmp_path_factory.mktemp("emulator") / "emulator.log", "w")
  server = subprocess.Popen(
    [sys.executable, "-m", "tests.gcs_emulator", "start", "--host=127.0.0.1",
     f"--port={port}", "--in-memory"],
    stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
  )  # fmt: skip
  url = f"http://127.0.0.1:{port}"
  env = {
    "STORAGE_EMULATOR_HOST": url,
    "TENSORSTORE_GCS_HTTP_URL": url,
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # this process reads the bucket too (restore_model)
  try:
    for _ in range(100):
      try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        break
      except OSError:
        time.sleep(0.1)
    gcsfs.GCSFileSystem(token="anon").mkdir(BUCKET)
    yield env
  finally:
    server.terminate()
    server.wait(timeout=30)
    log.close()
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value


def _run(cwd, env, host_cache, *command, check=True):
  """A command as one host of a job runs it: working directory `cwd`, local disk
  `host_cache` for its copy of the prepared dataset. The timeout only guards against a hang:
  a sweep's train and evaluate through the emulator took 300 s on a loaded 2-core machine."""
  return run_command(
    list(command),
    cwd=cwd,
    env={**env, "PYTHONPATH": str(REPO_ROOT), "CXR_JAX_CACHE": str(host_cache)},
    timeout=1200,
    check=check,
  )


def _final_params(workdir: str) -> list[np.ndarray]:
  _, model, _ = rundir.restore_model(workdir, "latest")
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param, nnx.BatchStat))]


def _listing(fs, path: str) -> list[str]:
  return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, refresh=True))


def test_a_run_lives_in_a_bucket(gcs, tmp_path):
  import gcsfs

  fs = gcsfs.GCSFileSystem(token="anon")
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  data_dir = f"gs://{BUCKET}/tfds"
  steps = ["--config.num_train_steps=12", "--config.checkpoint_every_steps=4",
           "--config.eval_every_steps=6"]  # fmt: skip

  # Prepared once (built on this host's disk, uploaded), then read by "other hosts".
  prepared = _run(cwd, gcs, tmp_path / "host0", sys.executable, "-m", "cxr_jax.data.prepare",
                  "--dataset=synthetic", f"--data_dir={data_dir}")  # fmt: skip
  assert "checks (must be 0): mask_not_binary=0" in prepared.stdout
  assert fs.exists(f"{BUCKET}/tfds/cxr_masks_and_labels")

  # The uninterrupted run: a sweep of one run, trained and evaluated into the bucket.
  sweep_file, root = tmp_path / "sweep.py", f"gs://{BUCKET}/sweep"
  sweep_file.write_text(
    "from cxr_jax.workflows.sweeps import Sweep\n"
    f"def get_sweep():\n  return Sweep(config='{REPO_ROOT}/configs/unet.py:smoke', "
    f"variants={{'unet': {{}}}}, overrides={{'data.data_dir': '{data_dir}', "
    "'num_train_steps': 12, 'checkpoint_every_steps': 4, 'eval_every_steps': 6})\n"
  )
  sweep = (sys.executable, "-m", "cxr_jax.sweep", f"--sweep={sweep_file}", f"--root={root}")
  swept = _run(cwd, gcs, tmp_path / "host1", *sweep)
  assert "sweep: unet/seed0 done" in swept.stderr, swept.stderr[-3000:]
  straight, killed = f"{root}/unet/seed0", f"gs://{BUCKET}/killed"
  assert {"results.csv", "results.md", "results.html"} <= set(_listing(fs, f"{BUCKET}/sweep"))
  assert {"sweep.json", "sweep.log", "eval"} <= set(_listing(fs, f"{BUCKET}/sweep/unet/seed0"))
  proc = _run(cwd, gcs, tmp_path / "host2", sys.executable, "-c", KILL_AFTER_SECOND_SAVE,
              *smoke_command(killed, data_dir, *steps)[3:], check=False)  # fmt: skip
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert "run.lock" in _listing(fs, f"{BUCKET}/killed")  # left behind by kill -9 ...
  resumed = _run(cwd, gcs, tmp_path / "host2", *smoke_command(killed, data_dir, *steps))
  assert "Taking over gs://cxr-test/killed/run.lock" in resumed.stderr  # ... and taken over
  said = [line for line in resumed.stderr.splitlines() if "Resumed from step" in line]
  assert said and int(said[0].split("Resumed from step ")[1].split()[0]) < 12, said
  for a, b in zip(_final_params(straight), _final_params(killed), strict=True):
    np.testing.assert_array_equal(a, b)

  # The run directory, in the bucket.
  names = _listing(fs, f"{BUCKET}/killed")
  assert {"checkpoints", "config.json", "metrics.jsonl"} <= set(names), names
  assert "run.lock" not in names
  assert any(n.startswith("events.out.tfevents") for n in names), names
  assert json.loads(fs.cat(f"{BUCKET}/killed/config.json"))["config"]["num_train_steps"] == 12
  metrics = [json.loads(x) for x in fs.cat(f"{BUCKET}/killed/metrics.jsonl").splitlines()]
  reference = [json.loads(x) for x in fs.cat(f"{straight[5:]}/metrics.jsonl").splitlines()]
  keys = ("step", "split", "loss", "dice")
  assert [[m.get(k) for k in keys] for m in metrics] == [
    [m.get(k) for k in keys] for m in reference
  ]

  # Evaluate and predict read the run in the bucket and write their outputs there.
  _run(cwd, gcs, tmp_path / "host3", sys.executable, "-m", "cxr_jax.evaluate",
       f"--workdir={killed}", "--split=test")  # fmt: skip
  summary = json.loads(fs.cat(f"{BUCKET}/killed/eval/test.json"))
  assert summary["step"] == 12 and summary["workdir"] == killed
  assert {"test.csv", "test_report.html"} <= set(_listing(fs, f"{BUCKET}/killed/eval"))
  for i in range(2):
    image = io.BytesIO()
    Image.fromarray(np.full((64, 48), 40 + 100 * i, np.uint8)).save(image, format="PNG")
    fs.pipe(f"{BUCKET}/inputs/x{i}.png", image.getvalue())
  _run(cwd, gcs, tmp_path / "host3", sys.executable, "-m", "cxr_jax.predict",
       f"--workdir={killed}", f"--input=gs://{BUCKET}/inputs",
       f"--output=gs://{BUCKET}/predicted")  # fmt: skip
  rows = fs.cat(f"{BUCKET}/predicted/predictions.csv").decode().splitlines()
  assert rows[0].startswith("image,height,width") and len(rows) == 3
  mask = Image.open(io.BytesIO(fs.cat(f"{BUCKET}/predicted/masks/x1.png")))
  assert mask.size == (48, 64)

  # The sweep again: its run is found done in the bucket. results expands a glob itself.
  again = _run(cwd, gcs, tmp_path / "host1", *sweep)
  assert "sweep: 1 runs, 1 done, 0 to run" in again.stderr
  table = _run(cwd, gcs, tmp_path / "host3", sys.executable, "-m", "cxr_jax.results",
               f"{root}/*/*", killed, f"--output=gs://{BUCKET}/table")  # fmt: skip
  assert "| unet | 1 |" in table.stdout and "| killed | 1 |" in table.stdout
  rows = list(csv.DictReader(io.StringIO(fs.cat(f"{BUCKET}/table/results.csv").decode())))
  assert [r["run"] for r in rows] == [straight, killed]
  for row in rows:
    run_summary = json.loads(fs.cat(f"{row['run'][5:]}/eval/test.json"))
    assert float(row["dice"]) == pytest.approx(run_summary["segmentation"]["dice"], rel=1e-5)

  assert list(cwd.iterdir()) == []  # nothing landed in the working directory
