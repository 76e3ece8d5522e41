"""The one CSV writer of the commands' per-image tables (evaluate's and predict's)."""

import csv
import io
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection): a
# file named '=HYPERLINK(...).png' must stay text.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def cell(value: Any) -> Any:
  """A value as written: '' for None and NaN, floats with 6 significant digits, and text that
  a spreadsheet would run as a formula prefixed with an apostrophe (numbers stay numbers)."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return ""
  if isinstance(value, float):
    return f"{value:.6g}"
  if isinstance(value, str) and value.startswith(_FORMULA_START):
    try:
      float(value)
    except ValueError:
      return "'" + value
  return value


def csv_text(
  fields: Sequence[str], rows: Sequence[Mapping[str, Any]], *, header: bool = True
) -> str:
  """A header row of `fields` (unless not `header`), then one row per mapping (missing keys
  blank), as CSV text."""
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, fieldnames=list(fields), extrasaction="ignore")
  if header:
    writer.writeheader()
  for row in rows:
    writer.writerow({k: cell(row.get(k)) for k in fields})
  return text.getvalue()


def write_csv(
  path: str | os.PathLike, fields: Sequence[str], rows: Sequence[Mapping[str, Any]]
) -> None:
  """A header row of `fields`, then one row per mapping (missing keys blank)."""
  epath.Path(path).write_text(csv_text(fields, rows))  # a local path or a gs:// URL


class RowWriter:
  """A CSV written row by row as rows come (a context manager): a header row of `fields`,
  then `write(row)` per row, flushed at once, so a table of 100k images is never held whole.
  A gs:// `path` (objects cannot be appended to) is written on local disk and uploaded whole
  when the writer closes."""

  def __init__(self, path: str | os.PathLike, fields: Sequence[str]):
    self.path, self.fields = os.fspath(path), list(fields)
    self._remote = "://" in self.path
    self._local = self.path

  def __enter__(self) -> "RowWriter":
    if self._remote:
      fd, self._local = tempfile.mkstemp(suffix=".csv")
      self._file = os.fdopen(fd, "w", newline="", encoding="utf-8")
    else:
      self._file = open(self._local, "w", newline="", encoding="utf-8")
    self._file.write(csv_text(self.fields, []))
    return self

  def write(self, row: Mapping[str, Any]) -> None:
    self._file.write(csv_text(self.fields, [row], header=False))
    self._file.flush()

  def __exit__(self, *exc) -> None:
    self._file.close()
    if self._remote:
      try:
        if exc[0] is None:
          with open(self._local, "rb") as src, epath.Path(self.path).open("wb") as dst:
            shutil.copyfileobj(src, dst)
      finally:
        os.remove(self._local)
