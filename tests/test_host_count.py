"""A run resumed on another process count (2 -> 1 -> 2 processes, gloo on CPU), one host
reading a two-process FSDP checkpoint, and the named, timed barriers of multi-process runs.

One module-scoped chain of runs shares the cost: 2 processes train steps 1-2 (parameters
split over them, shard_params), one host evaluates that checkpoint and trains steps 3-4 in
this process, then 2 processes train steps 5-6.
"""

import json
import logging
import os
import re
import socket
import subprocess
import sys
import textwrap

import pytest

from cxr_jax import evaluate
from cxr_jax.workflows import train
from tests.conftest import REPO_ROOT
from tests.conftest import smoke_command
from tests.test_train import smoke_config

# A constant learning rate keeps num_train_steps out of the compiled step: the second
# two-process run reuses the first one's compiled programs (the session's compilation cache).
_SETTINGS = {
  "eval_every_steps": 2,
  "checkpoint_every_steps": 2,
  "shard_params": True,
  "optim.schedule": "constant",
}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir, data_dir, steps: int) -> list[str]:
  """`cxr_jax.main` as `launch/multihost_cpu.sh` starts it: 2 processes, 1 CPU device each."""
  port, procs = _free_port(), []
  flags = [f"--config.{k}={v}" for k, v in {**_SETTINGS, "num_train_steps": steps}.items()]
  for rank in range(2):
    args = smoke_command(
      workdir,
      data_dir,
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={rank}",
      *flags,
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    procs.append(
      subprocess.Popen(
        args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
      )
    )
  try:
    logs = [proc.communicate(timeout=900)[0] for proc in procs]
  finally:
    for proc in procs:
      proc.kill()  # nothing left behind by a run that timed out
  for proc, log in zip(procs, logs):
    assert proc.returncode == 0, log[-3000:]
  return logs


def _iterator_states(workdir, step: int) -> dict[str, int]:
  data = workdir / "checkpoints" / str(step) / "data"
  return {p.name: json.loads(p.read_text())["next_index"] for p in data.glob("process_*.json")}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  root = tmp_path_factory.mktemp("host_count")
  data_dir, workdir = root / "tfds", root / "run"
  two_to_one = _two_processes(workdir, data_dir, steps=2)
  evaluated = evaluate.run(str(workdir), "test", show_progress=False)

  config = smoke_config("unet", data_dir)
  config.update_from_flattened_dict(_SETTINGS)
  config.num_train_steps = 4
  handler = _Records()
  logging.getLogger().addHandler(handler)
  try:
    train.train_and_evaluate(config, str(workdir))
  finally:
    logging.getLogger().removeHandler(handler)
  states = {2: _iterator_states(workdir, 2), 4: _iterator_states(workdir, 4)}
  one_to_two = _two_processes(workdir, data_dir, steps=6)
  states[6] = _iterator_states(workdir, 6)
  return {
    "two": two_to_one,
    "evaluated": evaluated,
    "one": handler.lines,
    "two_again": one_to_two,
    "states": states,
  }


class _Records(logging.Handler):
  def __init__(self):
    super().__init__(logging.INFO)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


def test_one_host_evaluates_a_checkpoint_two_processes_saved_with_split_parameters(chain):
  assert chain["states"][2] == {"process_0-of-2.json": 2, "process_1-of-2.json": 2}
  summary = chain["evaluated"]
  assert summary["step"] == 2 and summary["segmentation"]["num_images_with_mask"] > 0
  assert 0 < summary["segmentation"]["raw"]["all"]["dice"]["mean"] <= 1


def test_two_processes_resumed_by_one_restart_the_data_at_the_step_and_say_so(chain):
  said = [line for line in chain["one"] if line.startswith("Data: checkpoint 2")]
  assert said == [
    "Data: checkpoint 2 was saved by 2 processes, this run has 1: grain's iterator state is "
    "per process, so each process's iterator restarts at its batch 2, where a 1-process run "
    "is after 2 steps (the same epoch, this run's split of the examples)."
  ]
  assert chain["states"][4] == {"process_0-of-1.json": 4}  # moved to 2, then 2 steps read


def test_one_process_resumed_by_two_restarts_the_data_at_the_step_and_says_so(chain):
  for log in chain["two_again"]:
    assert "Data: checkpoint 4 was saved by 1 process, this run has 2" in log
    assert "restarts at its batch 4" in log and "Resumed from step 4" in log
  assert chain["states"][6] == {"process_0-of-2.json": 6, "process_1-of-2.json": 6}


@pytest.mark.parametrize(
  ("run", "barriers"),
  [
    (
      "two",
      ["run locked", "dataset prepared", "train step compiled", "save step 2", "training done"],
    ),
    ("two_again", ["run locked", "dataset prepared", "restore", "save step 6", "training done"]),
  ],
)
def test_every_barrier_of_a_two_process_run_is_named_and_timed(chain, run, barriers):
  for log in chain[run]:
    assert "jax.distributed: 2 processes joined in" in log
    met = [line.split("Barrier ")[1] for line in log.splitlines() if "Barrier '" in line]
    for name in barriers:
      assert any(m.startswith(f"'{name}': 2 processes met; this one waited ") for m in met), met


_STALL = textwrap.dedent("""
    import logging, sys, time
    from cxr_jax.core.run import multihost, platform
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rank, port = int(sys.argv[1]), sys.argv[2]
    platform.start(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=rank,
                   multihost=False, init_timeout_s=60)
    if rank == 1:
      time.sleep(2)
    multihost.barrier("late host", timeout_s=60, report_every_s=0.5)
    if rank == 1:
      time.sleep(4)  # never reaches the next barrier
      sys.exit(0)
    try:
      multihost.barrier("missing host", timeout_s=1)
    except TimeoutError as error:
      print("TimeoutError:", error)
""")


def test_a_late_or_missing_process_is_named_with_its_host_while_the_others_wait():
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _STALL, str(rank), str(port)],
      cwd=REPO_ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for rank in range(2)
  ]
  first, second = [proc.communicate(timeout=120)[0] for proc in procs]
  where = f"process 1 ({socket.gethostname()}, pid {procs[1].pid})"
  assert re.search(
    rf"Barrier 'late host': waiting \d s for {re.escape(where)} \(1 of 2 arrived\)\.", first
  ), first
  waited = [
    float(w)
    for w in re.findall(r"'late host': 2 processes met; this one waited ([\d.]+) s", first + second)
  ]
  # Process 0 waited for the late process 1 (2 s); process 1 waits at most one report interval
  # (0.5 s) and a round trip.
  assert waited[0] > 1 and waited[1] < 1, waited
  assert f"TimeoutError: Barrier 'missing host': {where} (1 of 2 arrived) after 1 s" in first
