"""Work that one process does for all: the others learn whether it succeeded."""

from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

T = TypeVar("T")


def on_process_0(work: Callable[[], T], failure: str) -> T | None:
  """`work()` on process 0 (its result there, None elsewhere); every process meets after it.

  An error on process 0 is raised there and, as a RuntimeError saying `failure`, on the
  others: no process is left waiting in a collective for one that failed. A collective:
  call it on every process.
  """
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = work()
    except Exception as e:  # noqa: BLE001  (re-raised once every process knows)
      error = e
  if jax.process_count() > 1:
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok and error is None:
      raise RuntimeError(failure)
  if error is not None:
    raise error
  return result
