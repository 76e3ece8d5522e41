"""End-to-end training: smoke runs, kill -9 and resume, 1 vs 4 devices, non-finite loss."""

import functools
import importlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cxr_jax.core import models
from cxr_jax.core.run import checkpoint
from cxr_jax.core.run import platform
from cxr_jax.core.run import rundir
from cxr_jax.core.training import steps
from cxr_jax.workflows import train
from tests.conftest import KILL_AFTER_SECOND_SAVE
from tests.conftest import REPO_ROOT
from tests.conftest import run_command
from tests.conftest import smoke_command


def smoke_config(name: str, data_dir: pathlib.Path):
  config = importlib.import_module(f"configs.{name}").get_config("smoke")
  config.data.data_dir = str(data_dir)
  return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp("tfds")


def read_metrics(workdir: pathlib.Path) -> list[dict]:
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize(
  "name", ["unet", "attention_unet", "classifier", "multitask", "unet_kaggle", "classify_kaggle"]
)
def test_smoke_run_writes_workdir(name, data_dir, tmp_path):
  config = smoke_config(name, data_dir)
  workdir = tmp_path / "run"
  val = train.train_and_evaluate(config, str(workdir))

  record = json.loads((workdir / "config.json").read_text())
  assert record["config"]["model"]["name"] == config.model.name
  assert record["config"]["data"]["name"] == "synthetic"
  assert record["dataset"]["name"].startswith("cxr_masks_and_labels/")
  assert record["versions"]["jax"]
  lines = read_metrics(workdir)
  train_lines = [line for line in lines if line["split"] == "train"]
  val_lines = [line for line in lines if line["split"] == "validation"]
  assert [line["step"] for line in train_lines] == [2, 4, 6]
  assert [line["step"] for line in val_lines] == [3, 6]
  assert all(np.isfinite(line["loss"]) for line in train_lines)
  expected = {"dice", "iou", "precision", "recall"} if name != "classifier" else set()
  if name in ("classifier", "multitask", "classify_kaggle"):
    expected |= {"accuracy", "auc", "sensitivity", "specificity"}
  assert expected <= set(val_lines[-1]), val_lines[-1]
  for key in expected:
    assert 0.0 <= val[key] <= 1.0 and val[key] == pytest.approx(val_lines[-1][key])
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [3, 6]
  assert any(p.name.startswith("events.out.tfevents") for p in workdir.iterdir())

  # The inference path restores what was trained.
  restored_config, model, step = rundir.restore_model(str(workdir), "latest")
  assert restored_config.model.name == config.model.name and step == 6
  if config.optim.ema_decay:  # the recipes keep an EMA: validated beside the trained weights
    assert "online_dice" in val_lines[-1]


def test_running_again_resumes_from_the_checkpoint(data_dir, tmp_path):
  config = smoke_config("unet", data_dir)
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  before = read_metrics(workdir)
  config.num_train_steps = 8
  train.train_and_evaluate(config, str(workdir))
  after = read_metrics(workdir)
  assert after[: len(before)] == before
  assert [line["step"] for line in after[len(before) :] if line["split"] == "train"] == [8]


def _run_main(workdir, data_dir, *extra, env=None, script=None, check=True):
  args = [
    f"--config={REPO_ROOT}/configs/unet.py:smoke",
    f"--workdir={workdir}",
    f"--config.data.data_dir={data_dir}",
    "--config.num_train_steps=12",
    "--config.checkpoint_every_steps=4",
    "--config.eval_every_steps=6",
    *extra,
  ]
  command = (
    [sys.executable, "-c", script, *args]
    if script
    else [sys.executable, "-m", "cxr_jax.main", *args]
  )
  return run_command(command, env=env, check=check)


def _final_params(workdir) -> list[np.ndarray]:
  """Parameters and batch statistics of the latest checkpoint."""
  _, model, _ = rundir.restore_model(str(workdir), "latest")
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param, nnx.BatchStat))]


def test_kill_minus_9_then_resume_is_bitwise_identical(data_dir, tmp_path):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  _run_main(straight, data_dir)
  proc = _run_main(killed, data_dir, script=KILL_AFTER_SECOND_SAVE, check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  complete = [int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit()]
  assert complete and max(complete) < 12  # it really stopped part-way
  resumed = _run_main(killed, data_dir)  # the same command resumes
  # ... without compiling the train step again: the persistent cache has it.
  assert "Train step compiled" in resumed.stderr and "1 hit(s), 0 miss(es)" in resumed.stderr
  for a, b in zip(_final_params(straight), _final_params(killed), strict=True):
    np.testing.assert_array_equal(a, b)

  # The resumed run's metrics continue the uninterrupted ones.
  def last(workdir):
    return [line for line in read_metrics(workdir) if line["split"] == "validation"][-1]

  assert last(killed) == last(straight)


def test_one_and_four_devices_agree(data_dir, tmp_path):
  one, four = tmp_path / "one", tmp_path / "four"
  flag = "--xla_force_host_platform_device_count="
  _run_main(one, data_dir, env={"XLA_FLAGS": flag + "1"})
  _run_main(four, data_dir, env={"XLA_FLAGS": flag + "4"})
  assert json.loads((four / "config.json").read_text())["devices"]["count"] == 4
  lines_one, lines_four = read_metrics(one), read_metrics(four)
  assert len(lines_one) == len(lines_four)
  for a, b in zip(lines_one, lines_four):
    assert (a["step"], a["split"]) == (b["step"], b["split"])
    for key in ("loss", "dice", "iou", "precision", "recall", "seg_loss"):
      if key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (key, a, b)


def test_an_image_size_the_model_cannot_take_fails_before_training(data_dir, tmp_path):
  config = smoke_config("unet", data_dir)
  config.data.image_size = 34  # the smoke U-Net (depth 2) needs a multiple of 4
  with pytest.raises(ValueError, match=r"multiples of 4; got 34x34.*config.data.image_size"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_nonfinite_loss_stops_with_step_and_checkpoint(data_dir, tmp_path):
  config = smoke_config("unet", data_dir)
  config.optim.learning_rate = 1e30
  config.optim.grad_clip = 0.0
  config.optim.warmup_steps = 0
  with pytest.raises(FloatingPointError, match=r"step \d+.*last good checkpoint"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_two_processes_train_as_one_job(data_dir, tmp_path):
  """The multi-host path on one machine: jax.distributed over gloo, a data slice each."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  workdir = tmp_path / "two"
  args = smoke_command(
    workdir,
    data_dir,
    f"--coordinator_address=127.0.0.1:{port}",
    "--num_processes=2",
  )
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
  }
  procs = [
    subprocess.Popen(
      args + [f"--process_id={i}"],
      cwd=REPO_ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  logs = [p.communicate(timeout=300)[1] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  assert json.loads((workdir / "config.json").read_text())["devices"] == {
    "platform": "cpu",
    "count": 2,
    "processes": 2,
  }
  # Metrics are global: both processes report the same validation numbers ...
  validation = [
    [
      line.split("validation:")[1].rsplit(" (", 1)[0]  # without the timing
      for line in log.splitlines()
      if "validation:" in line
    ]
    for log in logs
  ]
  assert len(validation[0]) == 2 and validation[0] == validation[1]
  # ... and only process 0 writes them, once.
  assert [(line["step"], line["split"]) for line in read_metrics(workdir)] == [
    (2, "train"),
    (3, "validation"),
    (4, "train"),
    (6, "train"),
    (6, "validation"),
  ]
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [3, 6]


def test_the_same_config_and_seed_give_bit_identical_parameters(data_dir, tmp_path):
  first, second = tmp_path / "first", tmp_path / "second"
  train.train_and_evaluate(smoke_config("unet", data_dir), str(first))
  train.train_and_evaluate(smoke_config("unet", data_dir), str(second))
  for a, b in zip(_final_params(first), _final_params(second), strict=True):
    np.testing.assert_array_equal(a, b)
  timing = (
    "steps_per_sec",
    "step_time_s",
    "images_per_sec",
    "images_per_sec_per_device",
    "tflops_per_device",
    "mfu",
    "eta_min",
  )

  def without_timing(workdir):
    return [{k: v for k, v in line.items() if k not in timing} for line in read_metrics(workdir)]

  assert without_timing(first) == without_timing(second)  # every loss and metric, exactly
  other = smoke_config("unet", data_dir)
  other.seed = 1
  train.train_and_evaluate(other, str(tmp_path / "other"))
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(_final_params(first), _final_params(tmp_path / "other"))
  )


def test_ema_weights_are_validated_and_restored_for_inference(data_dir, tmp_path):
  """With optim.ema_decay the checkpoint keeps the average beside the weights; validation
  scores the average (the trained weights as online_*) and inference restores the average."""
  config = smoke_config("unet", data_dir)
  config.optim.ema_decay = 0.5
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  val = [line for line in read_metrics(workdir) if line["split"] == "validation"][-1]
  assert {"dice", "online_dice"} <= set(val) and val["dice"] != val["online_dice"]

  _, model, _ = rundir.restore_model(str(workdir), "latest")
  restored = nnx.state(model, nnx.Param)
  manager = checkpoint.create_manager(
    str(workdir), rundir.load_config(str(workdir)), read_only=True
  )
  _, params, rest = nnx.split(model, nnx.Param, ...)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  ema, _ = checkpoint.restore_model(manager, 6, params, rest, device, item="ema")
  online, _ = checkpoint.restore_model(manager, 6, params, rest, device, item="model")
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa: E731
  np.testing.assert_array_equal(flat(restored), flat(ema))
  assert np.abs(flat(ema) - flat(online)).max() > 1e-4


def test_ema_update_and_mean_teacher_step(data_dir):
  config = smoke_config("unet", data_dir)
  # The average: d = min(decay, (1 + step) / (10 + step)), float leaves only.
  ema = steps.update_ema(
    {"w": jnp.ones(2), "n": jnp.int32(3)}, {"w": jnp.zeros(2), "n": jnp.int32(7)}, 90, 0.9
  )
  np.testing.assert_allclose(ema["w"], [0.9, 0.9])
  assert int(ema["n"]) == 7
  ema = steps.update_ema({"w": jnp.ones(2)}, {"w": jnp.zeros(2)}, 0, 0.99)
  np.testing.assert_allclose(ema["w"], [0.1, 0.1], rtol=1e-6)

  config.semi.weight = 1.0
  tx = steps.create_optimizer(config)
  graphdef = nnx.graphdef(models.create_model(config.model, rngs=nnx.Rngs(params=0, dropout=0)))
  with pytest.raises(ValueError, match="ema_decay"):
    steps.make_train_step(graphdef, config, tx)
  config.optim.ema_decay = 0.9
  with pytest.raises(ValueError, match="examples='all'"):
    steps.make_train_step(graphdef, config, tx)
  config.data.examples = "all"
  config.semi.rampup_steps = 1
  state = platform.jit(functools.partial(steps.create_train_state, config, tx))()
  train_step = platform.jit(steps.make_train_step(graphdef, config, tx))
  size = config.data.image_size
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.normal(size=(4, size, size, 1)).astype(np.float32),
    "lung_mask": (rng.random((4, size, size, 1)) > 0.5).astype(np.float32),
    "has_mask": np.array([1, 1, 0, 0], np.float32),
    "weight": np.ones(4, np.float32),
    "label": np.zeros(4, np.int32),
  }
  _, scalars = train_step(state, batch)
  assert scalars["semi_loss"] > 0.1  # the unmasked images learn the teacher's output
  _, scalars = train_step(state, dict(batch, has_mask=np.ones(4, np.float32)))
  assert float(scalars["semi_loss"]) == 0.0  # nothing to learn from: every image has a mask
