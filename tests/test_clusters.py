"""Clusters as people launch them: SLURM's environment, preemption, launchers, utilisation."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cxr_jax.core.run import platform
from cxr_jax.core.run import utilisation
from tests.conftest import REPO_ROOT
from tests.conftest import smoke_command
from tests.test_train import _final_params
from tests.test_train import read_metrics
from tests.test_train import smoke_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def _slurm_job_id() -> int:
  """A job id whose port (JAX: 61440 + id % 4096) is free on this machine."""
  for _ in range(50):
    with socket.socket() as s:
      job = int.from_bytes(os.urandom(2), "little") % 4096
      try:
        s.bind(("127.0.0.1", 61440 + job))
      except OSError:
        continue
      return job
  raise RuntimeError("no free port in JAX's SLURM range")


# The job's length. The preemption test's SIGTERM comes from the busy test process once step
# 10 is logged; 60 steps leave it room to land before the last.
_STEPS = 60


def _slurm_processes(workdir, data_dir, *extra):
  """Two `cxr_jax.main` processes with the environment `srun -n 2` gives, 2 CPU devices each."""
  job = _slurm_job_id()
  procs = []
  for rank in range(2):
    env = {
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
      "SLURM_JOB_ID": str(job),
      "SLURM_STEP_NODELIST": "localhost",
      "SLURM_NTASKS": "2",
      "SLURM_PROCID": str(rank),
      "SLURM_LOCALID": str(rank),
    }
    args = smoke_command(
      workdir,
      data_dir,
      f"--config.num_train_steps={_STEPS}",
      "--config.eval_every_steps=20",
      "--config.checkpoint_every_steps=20",
      "--expect_devices=4",
      *extra,
    )
    log = open(workdir.parent / f"{workdir.name}.{rank}.log", "w")
    procs.append(
      (subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    )
  return procs


def _wait(procs, timeout=300) -> list[str]:
  logs = []
  for proc, log in procs:
    proc.wait(timeout=timeout)
    log.close()
    logs.append(open(log.name).read())
    assert proc.returncode == 0, logs[-1][-3000:]
  return logs


def test_a_slurm_job_starts_by_itself_preempts_cleanly_and_resumes_exactly(data_dir, tmp_path):
  straight, preempted = tmp_path / "straight", tmp_path / "preempted"
  logs = _wait(_slurm_processes(straight, data_dir))
  for rank, log in enumerate(logs):
    assert f"JAX process {rank} of 2 (detected slurm); 2 local device(s)" in log
    assert "4 in all" in log

  # SIGTERM to both processes mid-run: both save the same step and exit 0.
  procs = _slurm_processes(preempted, data_dir)
  deadline = time.time() + 240
  while time.time() < deadline and "step 10/" not in open(procs[0][1].name).read():
    time.sleep(0.2)
  for proc, _ in procs:
    proc.send_signal(signal.SIGTERM)
  logs = _wait(procs)
  saved = [
    [
      line.split("saved step ")[1].split(";")[0]
      for line in log.splitlines()
      if "Preempted: saved step" in line
    ]
    for log in logs
  ]
  assert saved[0] and saved[0] == saved[1], saved
  step = int(saved[0][0])
  assert 10 <= step < _STEPS
  assert step in [int(p.name) for p in (preempted / "checkpoints").iterdir() if p.name.isdigit()]

  # The same command resumes and ends where the uninterrupted job did, bit for bit.
  _wait(_slurm_processes(preempted, data_dir))
  for a, b in zip(_final_params(straight), _final_params(preempted), strict=True):
    np.testing.assert_array_equal(a, b)


def test_expecting_other_devices_stops_at_start_up(data_dir, tmp_path):
  done = subprocess.run(
    [
      sys.executable,
      "-m",
      "cxr_jax.main",
      f"--config={REPO_ROOT}/configs/unet.py:smoke",
      f"--workdir={tmp_path}",
      f"--config.data.data_dir={data_dir}",
      "--expect_devices=8",
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert done.returncode != 0 and "--expect_devices=8, but JAX sees 1 devices" in done.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_cluster_detection_from_the_environment():
  assert platform.detected_cluster({}) is None
  assert platform.detected_cluster({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None
  assert platform.detected_cluster({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "16"}) == "slurm"
  assert platform.detected_cluster({"OMPI_COMM_WORLD_SIZE": "4"}) == "mpi"
  assert platform.detected_cluster({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == "tpu"
  assert platform.detected_cluster({"TPU_WORKER_HOSTNAMES": "w0"}) is None


# srun's environment on node 0 of a 2-node job with 8 GPUs per node (tasks 0-7 there).
_SLURM_JOB = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NODEID": "0"}
_PER_GPU = {
  **_SLURM_JOB,
  "SLURM_NTASKS": "16",
  "SLURM_NTASKS_PER_NODE": "8",
  "SLURM_GPUS_ON_NODE": "8",
}
_PER_NODE = {
  **_SLURM_JOB,
  "SLURM_NTASKS": "2",
  "SLURM_NTASKS_PER_NODE": "1",
  "SLURM_GPUS_ON_NODE": "8",
}


@pytest.mark.parametrize(
  ("layout", "environ", "device_ids"),
  [
    (
      "gpu per task, cgroup renumbered",
      {**_PER_GPU, "SLURM_LOCALID": "5", "CUDA_VISIBLE_DEVICES": "0"},
      [0],
    ),
    (
      "gpu per task, physical ids",
      {**_PER_GPU, "SLURM_LOCALID": "5", "CUDA_VISIBLE_DEVICES": "5"},
      [0],
    ),
    (
      "gpu per task, by UUID",
      {**_PER_GPU, "SLURM_LOCALID": "5", "CUDA_VISIBLE_DEVICES": "GPU-8f3e"},
      [0],
    ),
    (
      "2 gpus per task",
      {
        **_PER_GPU,
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_LOCALID": "3",
        "CUDA_VISIBLE_DEVICES": "6,7",
      },
      [0, 1],
    ),
    (
      "tasks share the node, all listed",
      {**_PER_GPU, "SLURM_LOCALID": "5", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"},
      [5],
    ),
    ("tasks share the node, none listed", {**_PER_GPU, "SLURM_LOCALID": "5"}, [5]),
    (
      "task per node, all listed",
      {**_PER_NODE, "SLURM_LOCALID": "0", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"},
      list(range(8)),
    ),
    ("task per node, none listed", {**_PER_NODE, "SLURM_LOCALID": "0"}, list(range(8))),
    (
      "task per node, srun's step layout only",
      {
        **{k: v for k, v in _PER_NODE.items() if k != "SLURM_NTASKS_PER_NODE"},
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
        "SLURM_LOCALID": "0",
      },
      list(range(8)),
    ),
    (
      "uneven layout, second node",
      {
        **_PER_GPU,
        "SLURM_NTASKS_PER_NODE": "",
        "SLURM_STEP_TASKS_PER_NODE": "8,4",
        "SLURM_NODEID": "1",
        "SLURM_LOCALID": "1",
      },
      [2, 3],
    ),
    (
      "a task without GPUs",
      {**_PER_GPU, "SLURM_LOCALID": "5", "CUDA_VISIBLE_DEVICES": "NoDevFiles"},
      None,
    ),
  ],
)
def test_jax_distributed_gets_the_gpus_each_slurm_task_can_see(layout, environ, device_ids):
  kwargs = platform.initialize_kwargs(
    environ,
    coordinator_address=None,
    num_processes=None,
    process_id=None,
    multihost=False,
    init_timeout_s=900,
  )
  assert kwargs == {"local_device_ids": device_ids, "initialization_timeout": 900}, layout


def test_a_single_process_or_a_named_coordinator_passes_no_device_ids():
  flags = {"num_processes": None, "process_id": None, "multihost": False, "init_timeout_s": 60}
  alone = {**_PER_NODE, "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}
  assert platform.initialize_kwargs(alone, coordinator_address=None, **flags) is None
  flags.update(num_processes=2, process_id=1)
  assert platform.initialize_kwargs(
    {**_PER_GPU, "SLURM_LOCALID": "5"}, coordinator_address="h:1", **flags
  ) == {
    "coordinator_address": "h:1",
    "num_processes": 2,
    "process_id": 1,
    "initialization_timeout": 60,
  }


def test_start_hands_jax_distributed_the_visible_gpu_not_slurm_localid(monkeypatch):
  import jax

  for name, value in {
    **_PER_GPU,
    "SLURM_LOCALID": "3",
    "SLURM_PROCID": "3",
    "CUDA_VISIBLE_DEVICES": "0",
  }.items():
    monkeypatch.setenv(name, value)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  collectives = jax.config.jax_cpu_collectives_implementation
  try:
    how = platform.start(
      coordinator_address=None,
      num_processes=None,
      process_id=None,
      multihost=False,
      init_timeout_s=900,
    )
  finally:
    jax.config.update("jax_cpu_collectives_implementation", collectives)
  # XLA's own timeout comes _GRACE_S after the watchdog's one-line message (issue 22, item 17).
  assert calls == [{"local_device_ids": [0], "initialization_timeout": 900 + platform._GRACE_S}]
  assert how == "detected slurm, local device ids [0]"


def test_the_slurm_launcher_runs_one_task_per_gpu(tmp_path):
  stub = tmp_path / "bin"
  stub.mkdir()
  (stub / "srun").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
  (stub / "srun").chmod(0o755)
  env = {
    **os.environ,
    "PATH": f"{stub}:{os.environ['PATH']}",
    "SLURM_GPUS_ON_NODE": "8",
    "SLURM_JOB_NUM_NODES": "2",
  }
  args = subprocess.run(
    [
      "bash",
      str(REPO_ROOT / "launch" / "slurm_gpu.sh"),
      "--config=configs/unet.py",
      "--workdir=/shared/run",
    ],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.split()
  assert "--ntasks-per-node=8" in args and "--gpus-per-task=1" in args
  assert "--expect_devices=16" in args and args[-2:] == [
    "--config=configs/unet.py",
    "--workdir=/shared/run",
  ]


def test_utilisation_in_the_log_and_metrics_and_a_profile(data_dir, tmp_path):
  from cxr_jax.workflows import train

  config = smoke_config("unet", data_dir)
  config.profile_steps = "2-3"
  train.train_and_evaluate(config, str(tmp_path / "run"))
  traces = list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
  assert traces and traces[0].stat().st_size > 0
  line = [m for m in read_metrics(tmp_path / "run") if m["split"] == "train"][-1]
  assert line["flops_per_step_per_device"] > 1e6 and line["images_per_sec_per_device"] > 0
  assert line["step_time_s"] == pytest.approx(1 / line["steps_per_sec"])
  assert "mfu" not in line  # a CPU has no known peak
  assert utilisation.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert utilisation.peak_flops("TPU v5 lite") == 197e12 and utilisation.peak_flops("cpu") is None
  got = utilisation.utilisation(1e12, 10.0, "TPU v4")
  assert got == {"tflops_per_device": 10.0, "mfu": pytest.approx(10e12 / 275e12)}
