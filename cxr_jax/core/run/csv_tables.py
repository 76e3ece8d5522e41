"""The one CSV writer of the commands' per-image tables (evaluate's and predict's)."""

import csv
import io
import math
import os
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
