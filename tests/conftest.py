"""Shared test fixtures."""

import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap

import ml_collections
import pytest
from absl import flags

from configs import unet as unet_config
from cxr_jax.workflows import train

# grain spawns worker processes that parse absl flags: parse them once here.
flags.FLAGS(sys.argv[:1])

# XLA's CPU compiles dominate the end-to-end tests, which build the same smoke models again
# in subprocesses: share one persistent compilation cache for the session (env, so the
# subprocesses see it too).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="cxr_jax_xla_cache_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"

# The suite runs on the CPU; with libtpu installed (the test extra, for tests/test_aot.py) JAX
# would also try to start a TPU backend, and libtpu log errors about the machine it is not on.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "chest-xray-masks-and-labels-512"


def finished_config(data_dir) -> ml_collections.ConfigDict:
  """`finished_run`'s config (a fresh copy each call: tests change it)."""
  config = unet_config.get_config("smoke")
  config.data.data_dir = str(data_dir)
  config.num_train_steps, config.max_to_keep = 9, 3
  return config


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> pathlib.Path:
  """The smoke runs' data_dir (the synthetic set, prepared by the first run using it); a
  module may define its own."""
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def finished_run(data_dir, tmp_path_factory) -> pathlib.Path:
  """A smoke U-Net run with checkpoints at steps 3, 6 and 9, trained once for the session
  (read-only: tests copy it)."""
  workdir = tmp_path_factory.mktemp("runs") / "run"
  train.train_and_evaluate(finished_config(data_dir), str(workdir))
  return workdir


def smoke_command(workdir, data_dir, *extra: str) -> list[str]:
  """`python -m cxr_jax.main` on the smoke U-Net config, into `workdir`."""
  return [
    sys.executable,
    "-m",
    "cxr_jax.main",
    f"--config={REPO_ROOT}/configs/unet.py:smoke",
    f"--workdir={workdir}",
    f"--config.data.data_dir={data_dir}",
    *extra,
  ]


# Runs main, but kill -9's itself right after the second checkpoint save has *started*
# (Orbax saves asynchronously, so that save is usually still being written).
KILL_AFTER_SECOND_SAVE = textwrap.dedent("""
    import os, signal
    from cxr_jax import main
    from cxr_jax.core.run import checkpoint
    original, calls = checkpoint.save, []
    def save(*args, **kwargs):
      original(*args, **kwargs)
      calls.append(1)
      if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.save = save
    main.run()
""")


def run_command(
  command: list[str],
  *,
  env: dict[str, str] | None = None,
  cwd: str | os.PathLike = REPO_ROOT,
  timeout: float = 300,
  check: bool = True,
) -> subprocess.CompletedProcess:
  """`command` on the CPU with `env` added, output captured; with `check`, exit status 0
  asserted (the failure shows the end of stderr)."""
  proc = subprocess.run(
    command,
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=cwd,
    env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
  )
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def run_module(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  """`python -m ARGS` from the checkout on the CPU, output captured, never raising."""
  return run_command([sys.executable, "-m", *args], timeout=timeout, check=False)


@pytest.fixture
def shared_data_dir() -> pathlib.Path:
  """The real X-rays beside the checkout; skips when they are absent (a user's fresh clone)."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data not found at {SHARED_DATA} (only CI and developers have ../shared)")
  return SHARED_DATA


def pytest_sessionfinish(session, exitstatus):
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
  if os.path.basename(cache).startswith("cxr_jax_xla_cache_"):
    import shutil

    shutil.rmtree(cache, ignore_errors=True)


# ----- a fake model shared by test_evaluate and test_predict -----
# (imported here, below the compilation-cache setup above, which must come first)
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402


class BrightIsLung(nnx.Module):
  """Fake model (exact, compiles in a second): lung where the normalised image is bright.

  p(abnormal) comes from the mean of the letterboxed image's top-left quarter (tests draw it
  per label).
  """

  def __init__(self, classify: bool = False, segment: bool = True):
    self.gain = nnx.Param(jnp.asarray(8.0))
    self.classify, self.segment = classify, segment

  def __call__(self, x, *, train: bool):
    out = {}
    if self.segment:
      out["mask_logits"] = self.gain[...] * x
    if self.classify:
      score = x[:, : x.shape[1] // 2, : x.shape[2] // 2, 0].mean((1, 2))
      out["class_logits"] = jnp.stack([-score, score], -1)
    return out


@pytest.fixture
def fake_model() -> type[BrightIsLung]:
  """The `BrightIsLung` class: `fake_model(classify=False, segment=True)` -> an nnx model."""
  return BrightIsLung
