"""predict's output folder: one predict at a time, one model per folder, and nothing written
before a fault lost or left half-written.

    OUT/predict.lock               held while a predict writes here (`run_lock.RunLock`)
    OUT/predict.json               which model (weights' hash, settings) and --input wrote here
    OUT/predictions.csv.partial    the CSV while predict runs: a row per image whose mask and
                                   overlay are complete, appended and flushed batch by batch
    OUT/predictions.csv            the same file, renamed when predict ends or is stopped
    OUT/masks/, OUT/overlays/      each PNG written under a temporary name, then renamed

A rerun with the same model and --input resumes: images whose row (and mask) are there are
skipped. Another model's or input's results are not mixed in: the folder is refused, naming
what it holds.
"""

import collections
import csv
import io
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from etils import epath

from cxr_jax.core.run import csv_tables
from cxr_jax.core.run import run_lock
from cxr_jax.data import paths as data_paths

LOCK_FILE = "predict.lock"
IDENTITY_FILE = "predict.json"
CSV_FILE = "predictions.csv"
PARTIAL_CSV_FILE = CSV_FILE + ".partial"
FOLDERS = ("masks", "overlays")
TMP_PREFIX = ".tmp-"  # a file being written; removed at the next start when left by a kill
_REMOTE_FLUSH_S = 60.0  # a bucket object cannot be appended to: rewritten this often


def display_name(path: epath.Path) -> str:
  """The file's name as valid UTF-8: bytes that are not (a Latin-1 name on a UTF-8 system)
  written as \\xNN, in the CSV and in the names of its mask and overlay alike."""
  return path.name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def output_stems(paths: Sequence[epath.Path], taken: Iterable[str] = ()) -> list[str]:
  """A distinct name for each input's mask and overlay (`masks/<name>.png`).

  The stem (`x` for x.png); the full name where stems clash (x.png and x.jpg, compared
  without case: one file on macOS or Windows); then `~2`, `~3` ... where a name is still
  taken (x.png.png's stem is x.png) or is in `taken` (outputs of a run being resumed).
  """
  names = [display_name(p) for p in paths]
  stems = [os.path.splitext(n)[0] or n for n in names]
  clashes = collections.Counter(s.casefold() for s in stems)
  seen = {t.casefold() for t in taken}
  chosen = []
  for name, stem in zip(names, stems):
    base = name if clashes[stem.casefold()] > 1 else stem
    candidate, k = base, 1
    while candidate.casefold() in seen:
      k += 1
      candidate = f"{base}~{k}"
    seen.add(candidate.casefold())
    chosen.append(candidate)
  return chosen


def write_whole(path: epath.Path, data: bytes) -> None:
  """Writes `data` under a temporary name in the same folder, then renames it to `path`: a
  reader never sees half a file, whatever stops the write (a full disk, Ctrl-C, a kill)."""
  if data_paths.is_url(str(path)):  # a bucket's object appears whole when its upload ends
    path.write_bytes(data)
    return
  tmp = path.parent / f"{TMP_PREFIX}{path.name}"
  try:
    tmp.write_bytes(data)
    tmp.replace(path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


class PredictionFolder:
  """OUT while predict writes into it (a context manager; see the module docstring).

  `identity`: what must match for a rerun to resume here (model, settings, input);
  `describe`: how the model is named to a user; `columns`: every CSV column predict may
  write, in order (the file has those that rows use).
  """

  def __init__(
    self, output: str, identity: Mapping[str, Any], describe: str, columns: Sequence[str]
  ):
    self.root = epath.Path(output)
    self.identity = {"model": describe, **identity}
    self.columns = list(columns)
    self.fields: list[str] = []
    self.done: dict[str, str] = {}  # CSV image cell of each image done -> its mask cell
    self._lock = run_lock.RunLock(
      output,
      lock_file=LOCK_FILE,
      advice="Wait for it to finish, or predict into another --output.",
    )
    self._remote = data_paths.is_url(str(output))
    # A bucket has no appending and no rename (a copy): there the CSV is rewritten whole.
    self._partial = self.root / (CSV_FILE if self._remote else PARTIAL_CSV_FILE)
    self._pending: list[str] = []
    self._written = time.monotonic()

  @classmethod
  def open(
    cls, output: str, identity: Mapping[str, Any], describe: str, columns: Sequence[str]
  ) -> "PredictionFolder":
    """Takes OUT (created if missing) for this predict. Raises RuntimeError when another
    predict holds it, ValueError when it holds another model's or input's results."""
    folder = cls(output, identity, describe, columns)
    folder._take()
    return folder

  def __enter__(self) -> "PredictionFolder":
    return self

  def _take(self) -> None:
    self.root.mkdir(parents=True, exist_ok=True)
    self._lock.acquire()
    try:
      self._check_identity()
      for folder in FOLDERS:
        (self.root / folder).mkdir(exist_ok=True)
        for stale in (self.root / folder).glob(f"{TMP_PREFIX}*"):
          stale.unlink(missing_ok=True)
      self._resume()
    except BaseException:
      self._lock.release()
      raise

  def __exit__(self, *exc) -> None:
    try:
      self._flush()
      if not self._remote and self._partial.exists():
        self._partial.replace(self.root / CSV_FILE)
    finally:
      self._lock.release()

  # ----- what this folder holds -----

  def _check_identity(self) -> None:
    record_path = self.root / IDENTITY_FILE
    if record_path.exists():
      try:
        record = json.loads(record_path.read_text())
      except (OSError, ValueError):
        record = {"model": f"an unreadable {record_path}"}
      # The model's name (its path as typed, its step) may differ; the weights may not.
      if {k: v for k, v in record.items() if k != "model"} == {
        k: v for k, v in self.identity.items() if k != "model"
      }:
        return
      raise ValueError(
        f"{self.root} holds predictions of {record.get('model')!r}"
        + (f" on --input={record.get('input')}" if record.get("input") else "")
        + f", not of {self.identity['model']!r} on --input={self.identity.get('input')} "
        "(or with other settings): predict into another --output, or delete its "
        f"{CSV_FILE}, {IDENTITY_FILE}, masks/ and overlays/ first."
      )
    leftovers = [name for name in (CSV_FILE, PARTIAL_CSV_FILE) if (self.root / name).exists()]
    leftovers += [f"{folder}/" for folder in FOLDERS if any(_pngs(self.root / folder, limit=1))]
    if leftovers:
      raise ValueError(
        f"{self.root} holds {', '.join(leftovers)} of an unknown model (no {IDENTITY_FILE}): "
        "predict into another --output, or delete them first."
      )
    write_whole(record_path, json.dumps(self.identity, indent=2).encode())

  def _resume(self) -> None:
    """Reads the rows of an earlier, stopped predict of the same model; keeps those whose
    mask and overlay are there; starts the partial CSV with them."""
    source = next(
      (self.root / n for n in (PARTIAL_CSV_FILE, CSV_FILE) if (self.root / n).exists()), None
    )
    rows, fields = [], []
    if source is not None:
      text = source.read_text()
      if not text.endswith("\n"):  # a row cut short by a kill: that image is redone
        text = text[: text.rfind("\n") + 1]
      reader = csv.DictReader(io.StringIO(text, newline=""))
      fields = list(reader.fieldnames or [])
      present = {f: set(_pngs(self.root / f)) for f in FOLDERS}
      for row in reader:
        mask = row.get("mask", "")
        if mask and not all(os.path.basename(mask) in present[f] for f in FOLDERS):
          continue  # its mask or overlay was removed: predicted again
        self.done[row["image"]] = mask
        rows.append(row)
    self.fields = [c for c in self.columns if c in fields]
    if source is not None:
      self._rewrite(rows)

  def taken_names(self) -> list[str]:
    """Mask names (without .png) of the rows already done."""
    return [os.path.splitext(os.path.basename(mask))[0] for mask in self.done.values() if mask]

  # ----- the CSV -----

  def add(self, rows: Sequence[Mapping[str, Any]]) -> None:
    """Appends `rows` (their files already in place) and flushes them to disk."""
    new = {k for row in rows for k in row if k not in self.fields}
    if new:  # a column the earlier rows did not need (a first DICOM): the file rewritten
      unknown = new - set(self.columns)
      if unknown:
        raise ValueError(f"predict wrote unknown CSV columns {sorted(unknown)}")
      self._flush()
      text = self._partial.read_text() if self._partial.exists() else ""
      old = list(csv.DictReader(io.StringIO(text, newline="")))
      self.fields = [c for c in self.columns if c in set(self.fields) | new]
      self._rewrite([*old, *rows])
      return
    self._pending.append(csv_tables.csv_text(self.fields, rows, header=False))
    if not self._remote or time.monotonic() - self._written > _REMOTE_FLUSH_S:
      self._flush()

  def _rewrite(self, rows: Sequence[Mapping[str, Any]]) -> None:
    self._pending.clear()
    write_whole(self._partial, csv_tables.csv_text(self.fields, rows).encode())
    self._written = time.monotonic()

  def _flush(self) -> None:
    if not self._pending:
      return
    text = "".join(self._pending)
    if self._remote:  # no appending to a bucket object: the whole file again
      write_whole(self._partial, (self._partial.read_text() + text).encode())
    else:
      with open(self._partial, "a", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    self._pending.clear()
    self._written = time.monotonic()


def _pngs(folder: epath.Path, limit: int | None = None) -> Iterable[str]:
  """Names of the finished PNGs in `folder` (none when it does not exist)."""
  if not folder.is_dir():
    return []
  names = (p.name for p in folder.iterdir() if p.name.endswith(".png"))
  names = (n for n in names if not n.startswith(TMP_PREFIX))
  return list(names) if limit is None else [n for n, _ in zip(names, range(limit))]
