"""Processes meeting: named, timed barriers, and work that one process does for all.

A barrier is met through jax.distributed's coordination service (a key per process that
arrived), not a device collective: a process that does not come is named in the log every
`report_every_s` (its host and pid) and, past `timeout_s`, in the error, instead of every
other process waiting in silence.
"""

import itertools
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
from jax._src import distributed  # the coordination service's client (as multihost_utils)
from jax.experimental import multihost_utils

T = TypeVar("T")

# A barrier inside training (a restore, a save) that a process misses for this long is an
# error: its host is stuck, and the job should fail rather than hold the others.
BARRIER_TIMEOUT_S = 3600.0
_PREFIX = "cxr_jax"
_numbers = itertools.count()  # every process meets the same barriers in the same order


def _client() -> Any:
  return distributed.global_state.client if jax.process_count() > 1 else None


def announce_host() -> None:
  """Publishes this process's host name and pid, so barriers can name a process that is
  missing. Called once, after jax.distributed.initialize."""
  if (client := _client()) is not None:
    where = f"{socket.gethostname()}, pid {os.getpid()}"
    client.key_value_set(f"{_PREFIX}/host/{jax.process_index()}", where, allow_overwrite=True)


def _missing(client, arrived_dir: str) -> str:
  """'process 1 (host, pid 42) (1 of 2 arrived)': who has not reached the barrier."""
  arrived = {int(key.rsplit("/", 1)[1]) for key, _ in client.key_value_dir_get(arrived_dir)}
  hosts = {int(k.rsplit("/", 1)[1]): v for k, v in client.key_value_dir_get(f"{_PREFIX}/host/")}
  missing = sorted(set(range(jax.process_count())) - arrived)
  if not missing:
    return ""
  names = [f"process {i}" + (f" ({hosts[i]})" if i in hosts else "") for i in missing[:8]]
  more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
  return f"{', '.join(names)}{more} ({len(arrived)} of {jax.process_count()} arrived)"


def barrier(
  name: str, *, timeout_s: float | None = BARRIER_TIMEOUT_S, report_every_s: float = 60.0
) -> float:
  """Waits until every process has reached barrier `name`; returns the seconds waited.

  A collective: every process calls it, in the same order. Logs one line when passed (its
  name, how long this process waited); while waiting, names the missing processes every
  `report_every_s`; past `timeout_s` (None: no limit) raises TimeoutError naming them.
  Process 0 watches the arrivals and releases the others with one key, so the coordination
  service is polled by one process only. Nothing to wait for in a single-process job.
  """
  client = _client()
  if client is None:
    return 0.0
  number = next(_numbers)
  key = f"{_PREFIX}/barrier/{number}"
  arrived_dir, done = f"{key}/arrived/", f"{key}/done"
  client.key_value_set(f"{arrived_dir}{jax.process_index()}", name)
  start = last_report = time.monotonic()
  pause = 0.005
  while True:
    waited = time.monotonic() - start
    if timeout_s is not None and waited > timeout_s:
      raise TimeoutError(
        f"Barrier {name!r}: {_missing(client, arrived_dir)} after {waited:.0f} s; the missing "
        "processes' logs say where they stopped."
      )
    step_s = min(report_every_s, timeout_s - waited if timeout_s is not None else report_every_s)
    if jax.process_index() == 0:
      if len(client.key_value_dir_get(arrived_dir)) == jax.process_count():
        client.key_value_set(done, "1")
        if number:  # every process has passed the previous barrier: drop its keys
          client.key_value_delete(f"{_PREFIX}/barrier/{number - 1}")
        break
      time.sleep(min(pause, max(step_s, 0.001)))
      pause = min(2 * pause, 1.0)
    else:
      try:
        client.blocking_key_value_get(done, max(int(step_s * 1000), 1))
        break
      except Exception as error:  # noqa: BLE001  (jax's runtime error; a deadline waits on)
        if "DEADLINE_EXCEEDED" not in str(error):
          raise
    if time.monotonic() - last_report >= report_every_s:
      last_report = time.monotonic()
      if missing := _missing(client, arrived_dir):  # '' : all came since the last look
        logging.warning("Barrier %r: waiting %.0f s for %s.", name, last_report - start, missing)
  waited = time.monotonic() - start
  logging.info(
    "Barrier %r: %d processes met; this one waited %.2f s.", name, jax.process_count(), waited
  )
  return waited


def on_process_0(work: Callable[[], T], failure: str, *, barrier_name: str) -> T | None:
  """`work()` on process 0 (its result there, None elsewhere); every process meets after it
  at barrier `barrier_name` (no time limit: the work may be long).

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
    barrier(barrier_name, timeout_s=None)
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok and error is None:
      raise RuntimeError(failure)
  if error is not None:
    raise error
  return result
