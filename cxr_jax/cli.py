"""What every command shares: flag errors, disk and permission errors and chatty library logs
reduced to one line each (the traceback behind --traceback). Only absl: the data layer's
prepare command uses it too."""

import errno
import logging
import os
import sys
import threading
from collections.abc import Callable

from absl import app
from absl import flags
from absl import logging as absl_logging

from cxr_jax import errors

# Orbax logs every file of every checkpoint at INFO; TFDS and grain their own progress.
_CHATTY = ("/orbax/", "/tensorflow_datasets/", "/grain/")
# Errors of the machine, not of the code: full disk, quota, read-only or forbidden paths.
# Also a path through a file (ENOTDIR) or onto a file (EEXIST, EISDIR).
_ENVIRONMENT_ERRNOS = (
  errno.ENOSPC,
  errno.EDQUOT,
  errno.EROFS,
  errno.EACCES,
  errno.EPERM,
  errno.ENOTDIR,
  errno.EEXIST,
  errno.EISDIR,
)


class _QuietLibraries(logging.Filter):
  """Drops INFO records of chatty libraries (their warnings and errors still show)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(part in record.pathname for part in _CHATTY)


class _NoLibraryTracebacks(logging.Filter):
  """Libraries' error records keep their one-line message, not the traceback behind it."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and "/cxr_jax/" not in record.pathname:
      record.msg = f"{record.getMessage()} [{record.exc_info[0].__name__}; --traceback for more]"
      record.args, record.exc_info, record.exc_text = None, None, None
    return True


def quiet_library_logs() -> None:
  """Filters absl's handler, through which these libraries log (call from a main)."""
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a config override's error (e.g. a misspelt key) as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
  except KeyError as e:  # config_flags: a key the config does not have
    message = f"unknown config key {e.args[0] if e.args else e}"
  except (AttributeError, ValueError, TypeError) as e:  # config_flags: a value of another type
    message = str(e)
  message = " ".join(message.split())  # one line
  print(f"{os.path.basename(argv[0])}: error in the flags: {message}", file=sys.stderr)
  print("Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
  sys.exit(2)


def disk_full(e: BaseException) -> bool:
  """Orbax/TensorStore report a full disk as a ValueError, not an OSError."""
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "No space left on device" in text


class _OneLinePerError:
  """sys/threading excepthook: each distinct error once, as one line, not a traceback each.

  A failed checkpoint write makes Orbax's and TensorStore's threads and callbacks report
  the same failure dozens of times (a full disk gave 45 tracebacks).
  """

  def __init__(self):
    self.seen: set[str] = set()

  def __call__(self, *args) -> None:
    exc_type, exc = (args[0].exc_type, args[0].exc_value) if len(args) == 1 else args[:2]
    line = f"{exc_type.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if line not in self.seen:
      self.seen.add(line)
      print(f"(background) {line[:300]}", file=sys.stderr)


def _exit_with(status: int, message: str) -> None:
  """Ends with `message` as stderr's last line, without the interpreter's shutdown, where
  the failed save's background tasks would report the same error again.

  Those tasks may still be writing while we exit: stderr is pointed at /dev/null first and
  the message written to the saved descriptor, so nothing can land after it.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  saved = os.dup(2)
  os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
  os.write(saved, f"{message}\n".encode())
  os._exit(status)


def config_package_on_path(argv: list[str]) -> None:
  """Puts the folder above a `--config=.../configs/x.py` file's package on sys.path, so its
  `from configs import default` works from any directory (an sbatch script's, say)."""
  for arg in argv[1:]:
    if arg.startswith("--config="):
      folder = os.path.dirname(os.path.abspath(arg.split("=", 1)[1].split(":", 1)[0]))
      if os.path.exists(os.path.join(folder, "__init__.py")):
        root = os.path.dirname(folder)
        if root not in sys.path:
          sys.path.insert(0, root)


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)` for a command: short messages for bad flags, for errors a user can fix
  (`errors.UserError`: exit status 2) and for errors of the machine (disk full, read-only or
  forbidden paths: 1); the traceback behind --traceback."""
  flags.DEFINE_bool("traceback", False, "Show the full traceback of user and disk errors.")
  config_package_on_path(sys.argv)

  def guarded(argv: list[str]) -> None:
    if not flags.FLAGS.traceback:
      threading.excepthook = _OneLinePerError()  # the main thread's errors keep tracebacks
      absl_logging.get_absl_handler().addFilter(_NoLibraryTracebacks())
    try:
      main(argv)
    except errors.UserError as e:
      if flags.FLAGS.traceback:
        raise
      _exit_with(2, f"{os.path.basename(argv[0])}: {' '.join(str(e).split())}")
    except (OSError, ValueError, RuntimeError) as e:
      if flags.FLAGS.traceback:
        raise
      if disk_full(e):
        _exit_with(
          1,
          f"{os.path.basename(argv[0])}: the disk is full ({str(e).splitlines()[0][:200]}). "
          "Free space (or choose another path) and rerun: the same command resumes from "
          "the last complete checkpoint; --traceback shows where it happened.",
        )
      if not isinstance(e, OSError) or e.errno not in _ENVIRONMENT_ERRNOS:
        raise
      where = f" {e.filename}" if e.filename else ""
      _exit_with(
        1,
        f"{os.path.basename(argv[0])}: cannot write{where}: {e.strerror}. Free space or fix "
        "the permissions (or choose another path) and rerun; --traceback shows where.",
      )

  app.run(guarded, flags_parser=_parse_flags)
