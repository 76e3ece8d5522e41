"""A one-line progress bar for long commands."""

import sys
import time
from typing import TextIO


class Progress:
  """A one-line progress bar on stderr (or a line per ~10% when stderr is not a terminal)."""

  def __init__(self, total: int, desc: str, stream: TextIO | None = None, width: int = 30):
    self.total, self.desc, self.width = max(total, 0), desc, width
    self.stream = stream or sys.stderr
    self.count = 0
    self.start = time.monotonic()
    self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self._last_tenth = -1

  def update(self, n: int = 1, note: str = "") -> None:
    self.count += n
    done = self.count / self.total if self.total else 1.0
    elapsed = time.monotonic() - self.start
    eta = elapsed / self.count * (self.total - self.count) if self.count else 0.0
    filled = int(round(done * self.width))
    line = (
      f"{self.desc} [{'#' * filled}{'.' * (self.width - filled)}] "
      f"{self.count}/{self.total} {elapsed:.0f}s elapsed, ~{eta:.0f}s left"
    )
    if self._tty:
      self.stream.write(f"\r{line} {note[:40]:<40}")
      self.stream.flush()
    elif int(done * 10) > self._last_tenth:
      self._last_tenth = int(done * 10)
      self.stream.write(line + "\n")
      self.stream.flush()

  def close(self) -> None:
    if self._tty:
      self.stream.write("\n")
      self.stream.flush()
