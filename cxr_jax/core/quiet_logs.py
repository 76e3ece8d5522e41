"""Keeps chatty libraries' INFO logs out of the command-line tools' output."""

import logging

from absl import logging as absl_logging

# Orbax logs every file of every checkpoint at INFO; TFDS and grain their own progress.
_CHATTY = ("/orbax/", "/tensorflow_datasets/", "/grain/")


class _QuietLibraries(logging.Filter):
  """Drops INFO records of chatty libraries (their warnings and errors still show)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(part in record.pathname for part in _CHATTY)


def install() -> None:
  """Filters absl's handler, through which these libraries log (call from a main)."""
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())
