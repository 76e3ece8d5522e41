"""What the readers of datasets on disk share: listing files, capped reads, CSV tables, and
the Reader protocol's bookkeeping (numpy only)."""

import csv
import os
import pathlib
from collections.abc import Iterator

import numpy as np

from cxr_jax.data import images
from cxr_jax.data.kaggle_archive import MAX_FILE_BYTES
from cxr_jax.data.records import DataError
from cxr_jax.data.records import Skip

_IGNORED_DIRS = ("__MACOSX", ".ipynb_checkpoints")


def require_dir(manual_dir: str, expected: str) -> pathlib.Path:
  """manual_dir as a folder that exists, or a `DataError` saying what it should hold."""
  if not manual_dir:
    raise DataError(f"No manual_dir given; expected {expected}.")
  path = pathlib.Path(os.path.expanduser(manual_dir))
  if not path.is_dir():
    raise DataError(f"manual_dir {path} is not a folder; expected {expected}.")
  return path


def list_files(root: pathlib.Path, suffixes: tuple[str, ...]) -> list[str]:
  """Posix paths below `root` (relative to it) whose lower-cased names end in `suffixes`,
  sorted; hidden files and macOS/Jupyter litter left out."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _IGNORED_DIRS and not d.startswith("."))
    rel = pathlib.Path(dirpath).relative_to(root)
    for name in filenames:
      if name.lower().endswith(suffixes) and not name.startswith("."):
        found.append((rel / name).as_posix())
  return sorted(found)


def stem(name: str) -> str:
  """'a/b/x.png' -> 'x'."""
  return pathlib.PurePosixPath(name).stem


def read_bytes(path: pathlib.Path) -> bytes:
  """A file's bytes; refuses one over MAX_FILE_BYTES (not an X-ray, or a bomb)."""
  size = path.stat().st_size
  if size > MAX_FILE_BYTES:
    raise ValueError(f"{size / 2**20:.0f} MiB, over the {MAX_FILE_BYTES / 2**20:.0f} MiB limit")
  return path.read_bytes()


def read_rows(path: pathlib.Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
  """(line number, {column: cell}) of a CSV with a header row, streamed; a `DataError` naming
  the file when a required column is missing."""
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f)
    header = [h.strip() for h in next(reader, [])]
    if missing := [c for c in required if c not in header]:
      raise DataError(
        f"{path}: no column {', '.join(map(repr, missing))} in its header row "
        f"({', '.join(header) or 'empty'}); expected the columns {', '.join(required)}."
      )
    for row in reader:
      if any(cell.strip() for cell in row):
        yield reader.line_num, dict(zip(header, row, strict=False))


class DiskReader:
  """A reader's common part: its root folder and the files it found unusable while listing."""

  def __init__(self, root: pathlib.Path):
    self.root = root
    self.skipped: list[Skip] = []

  def describe(self) -> str:
    return str(self.root)

  def where(self, file: str) -> str:
    return str(self.root / file)

  def read_image(self, file: str, skip) -> np.ndarray | None:
    """[H, W] uint8 of an image file below the root, or None after `skip`."""
    try:
      return images.decode_greyscale(read_bytes(self.root / file))
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ...
      skip(Skip(file, "unreadable image", str(e)))
      return None

  def read_mask(self, file: str, shape: tuple[int, ...], image_id: str, skip) -> np.ndarray | None:
    """[H, W] 0/1 of a binary mask file (> 127, or 1 of a 0/1 mask) that must be `shape`, or
    None after `skip` (its image is kept without it)."""
    kept = f"{image_id} kept without it"
    try:
      mask = images.decode_mask(read_bytes(self.root / file))
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ...
      skip(Skip(file, "unreadable mask", f"{e}; {kept}"))
      return None
    if mask.shape != tuple(shape):
      skip(Skip(file, "mask size differs", size_detail(mask.shape, shape, kept)))
      return None
    return mask


def size_detail(mask_shape, image_shape, kept: str) -> str:
  return (
    f"mask is {mask_shape[0]}x{mask_shape[1]} but its image is "
    f"{image_shape[0]}x{image_shape[1]}; {kept}"
  )
