"""One training run per directory: DIR/run.lock."""

import contextlib
import json
import logging
import os
import socket
import threading
import time

import fsspec
from etils import epath

from cxr_jax.core.run import multihost
from cxr_jax.core.run.layout import RunDir
from cxr_jax.data import paths

LOCK_HEARTBEAT_S = 30.0
LOCK_STALE_S = 300.0  # a lock not refreshed for this long belongs to a run that died


class RunLock:
  """DIR/run.lock: one training run per directory, on local disks and shared filesystems.

  Created with O_EXCL (atomic on local disks and NFS), or in a bucket (gs://) as an object
  that must not exist yet (GCS's ifGenerationMatch=0) and is read back to check that it
  holds this run's token; a thread refreshes its time every
  LOCK_HEARTBEAT_S. A lock is taken over when its process is gone (same host) or its
  heartbeat is older than LOCK_STALE_S (a killed run, any host), so kill -9 never leaves a
  directory stuck for long. Use as a context manager; release() removes the file.
  """

  def __init__(
    self,
    workdir: str,
    *,
    lock_file: str | None = None,
    advice: str = "Wait for it to finish, or train into another --workdir.",
  ):
    """A run directory's lock, or `lock_file` in `workdir` (another command's folder, e.g.
    predict's output); `advice`: what the refusal tells a second process to do."""
    self.path = str(RunDir(workdir).lock if lock_file is None else RunDir(workdir).path / lock_file)
    self.advice = advice
    self._remote = paths.is_url(self.path)
    self.token = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(8).hex()}"
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def __enter__(self) -> "RunLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> None:
    record = {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "started": time.time(),
      "token": self.token,
    }
    for _ in range(3):  # more tries after a stale lock was moved aside
      if not self._create(json.dumps(record)):
        holder = self._holder()
        if holder is None:
          continue  # vanished or stale: removed, try again
        raise RuntimeError(
          f"{os.path.dirname(self.path)} is in use by another run (pid {holder.get('pid')} on "
          f"host {holder.get('host')!r}, started {time.ctime(holder.get('started', 0))}). "
          f"{self.advice} If that run is dead, "
          f"delete {self.path} (it is also taken over once {LOCK_STALE_S:.0f} s old)."
        ) from None
      self._thread = threading.Thread(target=self._beat, daemon=True, name="run-lock")
      self._thread.start()
      return
    raise RuntimeError(f"Could not take {self.path}; another run keeps taking it.")

  def _create(self, text: str) -> bool:
    """Writes the lock holding `text` unless it exists; whether this run holds it now."""
    if self._remote:
      self._forget_listings()
      if epath.Path(self.path).exists():
        return False
      fs, path = fsspec.core.url_to_fs(self.path)
      try:
        with fs.open(path, "xb") as f:  # ifGenerationMatch=0: fails when it exists
          f.write(text.encode())
      except FileExistsError:
        return False
      return self._is_mine()  # a store that ignores the precondition: the last writer wins
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    try:
      with os.fdopen(fd, "w") as f:
        f.write(text)
    except BaseException:
      with contextlib.suppress(OSError):
        os.remove(self.path)  # never leave a half-written lock behind
      raise
    return True

  def _holder(self) -> dict | None:
    """The live holder's record; None (after removing the file) when it is stale."""
    self._forget_listings()
    try:
      age = time.time() - epath.Path(self.path).stat().mtime
      holder = json.loads(epath.Path(self.path).read_text())
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      holder = {}  # half-written by a run killed at its start: judged by age alone
    dead_here = holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid"))
    if (dead_here or age > LOCK_STALE_S) and self._remote:
      epath.Path(self.path).unlink(missing_ok=True)  # the precondition settles who takes it
      logging.warning("Taking over %s from a run that is gone (%s).", self.path, holder)
      return None
    if dead_here or age > LOCK_STALE_S:
      # Moved aside atomically: of several runs judging it stale, one moves it; none removes
      # a lock another one has just created in its place.
      aside = f"{self.path}.stale.{self.token}"
      try:
        os.rename(self.path, aside)
      except FileNotFoundError:
        return None  # another run moved it first: race for the new one
      with open(aside) as f:
        moved = f.read()
      os.remove(aside)
      if holder and moved.strip() and json.loads(moved) != holder:
        raise RuntimeError(f"{self.path} changed hands while it was judged stale; try again.")
      logging.warning("Taking over %s from a run that is gone (%s).", self.path, holder)
      return None
    return holder

  def _forget_listings(self) -> None:
    """gcsfs answers `exists`/`stat` from folder listings it cached (e.g. the workdir checks'
    one, made before the lock existed; found by tests/test_gcs.py): a bucket's lock is judged
    by the bucket itself."""
    if self._remote:
      fs, path = fsspec.core.url_to_fs(self.path)
      fs.invalidate_cache(path)  # this module's writes
      epath.backend.fsspec_backend.fs(self.path).invalidate_cache(path)  # epath's own instance

  def _is_mine(self) -> bool:
    self._forget_listings()
    try:
      return json.loads(epath.Path(self.path).read_text()).get("token") == self.token
    except (OSError, ValueError):
      return False

  def _beat(self) -> None:
    while not self._stop.wait(LOCK_HEARTBEAT_S):
      if not self._is_mine():
        logging.error("%s is no longer this run's lock: another run took it over.", self.path)
        return
      with contextlib.suppress(OSError):
        if self._remote:  # an object's time changes when it is written again
          lock = epath.Path(self.path)
          lock.write_text(lock.read_text())
        else:
          os.utime(self.path)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
      if self._is_mine():
        epath.Path(self.path).unlink(missing_ok=True)


def lock_run(workdir: str) -> RunLock | None:
  """Process 0 takes DIR's RunLock; every process learns whether it got it (collective)."""

  def take() -> RunLock:
    lock = RunLock(workdir)
    lock.acquire()
    return lock

  return multihost.on_process_0(
    take, f"Process 0 could not lock {workdir}; its log says why.", barrier_name="run locked"
  )


def _pid_alive(pid) -> bool:
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
