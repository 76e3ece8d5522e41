"""Stopping cleanly on a preemption notice (SIGTERM): every process saves the same step.

Multi-process jobs use JAX's preemption sync manager (`jax.distributed` propagates a notice
to every host and picks the step all of them will stop after); a single process stops after
the step during which SIGTERM arrived.
"""

import logging
import signal

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """`should_stop(step)`: call after every train step, on every process."""

  def __init__(self):
    self._notice = False
    self._synced = jax.process_count() > 1  # jax.distributed is up: its sync manager
    self._previous = None
    if not self._synced:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    del frame
    logging.warning("Received signal %d: saving at the end of this step, then stopping.", signum)
    self._notice = True

  def should_stop(self, step: int) -> bool:
    if self._synced:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._notice

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
