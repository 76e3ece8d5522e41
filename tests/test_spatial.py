"""The image height split over devices (config.mesh.space): the same numbers as unsplit.

The checks run in one subprocess on 4 forced CPU devices (tests/spatial_checks.py).
"""

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import run_command
from tests.conftest import smoke_command

FOUR_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


def _on_four_devices(command: list[str], check: bool = True) -> subprocess.CompletedProcess:
  # a hang guard: the checks took over 600 s on a 2-core machine under heavy load
  return run_command(command, env=FOUR_DEVICES, timeout=1800, check=check)


@pytest.fixture(scope="module")
def checks():
  return json.loads(_on_four_devices([sys.executable, "-m", "tests.spatial_checks"]).stdout)


@pytest.mark.parametrize("space", [2, 4])
def test_forward_and_backward_with_the_height_split_equal_the_whole_image(checks, space):
  got = checks[f"forward_backward_space{space}"]
  assert got["halo_exchange"]  # really partitioned: XLA exchanges the convolutions' halos
  assert "'space'" in got["output_spec"]  # and the output stays split
  assert got["output_scale"] > 0.1
  assert got["output"] < 1e-5 and got["grads"] < 1e-5
  assert got["batch_stats"] < 1e-6  # batch norm over the whole image, not per slice


def test_a_train_step_with_space_2_equals_space_1(checks):
  assert checks["param_scale"] > 0.1
  assert checks["train_step_space2_vs_1"] < 1e-4


def test_fsdp_splits_the_state_and_gives_the_same_step(checks):
  assert checks["fsdp_split_arrays"] > 0
  assert checks["train_step_fsdp_vs_replicated"] < 1e-5


def test_predict_on_4096_px_with_space_4_equals_the_whole_image(checks):
  got = checks["predict_4096"]
  assert got["shape"] == [4096, 4096] and got["lung_pixels"] > 1000
  assert got["differing_pixels"] == 0


def test_a_space_2_run_resumes_with_space_1(tmp_path):
  workdir, data_dir = tmp_path / "run", tmp_path / "tfds"

  def train(*extra):
    return _on_four_devices(smoke_command(workdir, data_dir, *extra)).stderr

  first = train("--config.mesh.space=2", "--config.num_train_steps=4")
  assert "Mesh: {'data': 2, 'space': 2}" in first
  second = train("--config.mesh.space=1", "--config.num_train_steps=6")
  assert "Mesh: {'data': 4, 'space': 1}" in second
  assert re.search(r"Resumed from step 4 ", second)
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert max(line["step"] for line in lines) == 6


def test_a_space_that_does_not_divide_the_devices_is_refused(tmp_path):
  proc = _on_four_devices(
    smoke_command(tmp_path / "run", tmp_path / "tfds", "--config.mesh.space=3"), check=False
  )
  assert proc.returncode != 0
  assert "config.mesh.space=3 must divide the 4 devices; valid: [1, 2, 4]" in proc.stderr
