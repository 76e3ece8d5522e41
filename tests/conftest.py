"""Shared test fixtures."""

import pathlib
import sys

import pytest
from absl import flags

# grain spawns worker processes that parse absl flags: parse them once here.
flags.FLAGS(sys.argv[:1])

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "chest-xray-masks-and-labels-512"


@pytest.fixture
def shared_data_dir() -> pathlib.Path:
  """The real X-rays beside the checkout; skips when they are absent (a user's fresh clone)."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data not found at {SHARED_DATA} (only CI and developers have ../shared)")
  return SHARED_DATA
