"""Finds the Kaggle "Chest Xray Masks and Labels" archive (a folder or its .zip) and pairs
its files.

    [data/]Lung Segmentation/
      CXR_png/             MCUCXR_0001_0.png, CHNCXR_0001_0.png, ...  (`_0` normal, `_1` abnormal)
      masks/               MCUCXR_0001_0.png (Montgomery), CHNCXR_0001_0_mask.png (Shenzhen)
      test/                duplicates of the CXR_png images that have no mask (not read)
      ClinicalReadings/    optional, one <id>.txt per image

The real archive has the tree twice (`Lung Segmentation/` and `data/Lung Segmentation/`):
`find_archive` picks one, so no image is counted twice.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import zipfile

from cxr_jax.data.images import IMAGE_SUFFIXES
from cxr_jax.data.records import DataError
from cxr_jax.data.records import Skip

SOURCE_OF_PREFIX = {"MCUCXR": "montgomery", "CHNCXR": "shenzhen"}
_ID_PATTERN = re.compile(r"^(MCUCXR|CHNCXR)_[0-9]+_([01])$")  # ASCII digits only
# The largest file read (bytes): the real X-rays are tens of MB; a larger zip member or file
# is a decompression bomb or not an X-ray, and would be read whole into memory.
MAX_FILE_BYTES = 256 * 2**20
_MAX_DEPTH = 3  # folders searched below manual_dir (and inside a .zip) for CXR_png/
_IGNORED_DIRS = ("__MACOSX", ".ipynb_checkpoints")

EXPECTED = (
  "the Kaggle 'Chest Xray Masks and Labels' archive, unpacked or as its .zip: a folder "
  "'Lung Segmentation/' (or 'data/Lung Segmentation/') holding CXR_png/ with "
  "MCUCXR_*_0|1.png / CHNCXR_*_0|1.png images and masks/"
)


class ArchiveError(DataError):
  """The manual_dir does not hold a usable archive, or a file is bad in strict mode."""


@dataclasses.dataclass(frozen=True)
class Record:
  """One chest X-ray of the archive, before decoding. Paths are relative to the tree."""

  id: str
  source: str  # 'montgomery' | 'shenzhen'
  label: int  # 0 normal, 1 abnormal
  image: str
  mask: str | None
  readings: str | None


# ----- file trees: a folder or a .zip, both addressed by posix paths -----


class _Tree:
  """Read-only view of the files below a folder or inside a .zip."""

  def __init__(self, location: str, names: list[str], zip_file: zipfile.ZipFile | None):
    self.location = location
    self.names = names  # posix paths of all files considered, relative to the tree
    self._zip = zip_file

  def read(self, name: str) -> bytes:
    if self._zip is not None:
      size = self._zip.getinfo(name).file_size  # as declared; the read is capped too
      opened = self._zip.open(name)
    else:
      path = pathlib.Path(self.location) / name
      size = path.stat().st_size
      opened = open(path, "rb")
    with opened as f:
      data = f.read(MAX_FILE_BYTES + 1) if size <= MAX_FILE_BYTES else b""
    if size > MAX_FILE_BYTES or len(data) > MAX_FILE_BYTES:
      raise ValueError(
        f"{max(size, len(data)) / 2**20:.0f} MiB, over the "
        f"{MAX_FILE_BYTES / 2**20:.0f} MiB read limit (a decompression bomb?)"
      )
    return data

  def describe(self, name: str) -> str:
    """A path a person can find: 'dir/Lung Segmentation/CXR_png/x.png' or 'a.zip:...'."""
    if self._zip is not None:
      return f"{self.location}:{name}"
    return str(pathlib.Path(self.location) / name)


def _open_dir(path: pathlib.Path) -> _Tree:
  names = []
  for dirpath, dirnames, filenames in os.walk(path):
    rel = pathlib.Path(dirpath).relative_to(path)
    depth = len(rel.parts)
    dirnames[:] = sorted(d for d in dirnames if d not in _IGNORED_DIRS)
    if depth > _MAX_DEPTH:  # CXR_png/ and masks/ lie at most this deep: stop below them
      dirnames[:] = []
    names.extend((rel / f).as_posix() for f in sorted(filenames))
  return _Tree(str(path), names, None)


def _open_zip(path: pathlib.Path) -> _Tree:
  try:
    zip_file = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise ArchiveError(f"Cannot open {path} as a .zip archive ({e}); expected {EXPECTED}.") from e
  names = [
    n
    for n in zip_file.namelist()
    if not n.endswith("/") and not any(part in _IGNORED_DIRS for part in n.split("/"))
  ]
  return _Tree(str(path), names, zip_file)


def _roots(tree: _Tree) -> dict[str, int]:
  """Folders (posix prefix, '' or ending in '/') holding CXR_png/<image>, with image counts."""
  roots: dict[str, int] = {}
  for name in tree.names:
    parts = name.split("/")
    if len(parts) >= 2 and parts[-2] == "CXR_png" and parts[-1].lower().endswith(IMAGE_SUFFIXES):
      prefix = "/".join(parts[:-2])
      prefix = prefix + "/" if prefix else ""
      roots[prefix] = roots.get(prefix, 0) + 1
  return roots


@dataclasses.dataclass
class Archive:
  """The archive tree chosen inside manual_dir: `root` is '' or a prefix ending in '/'."""

  tree: _Tree
  root: str
  ignored_roots: list[str]

  def read(self, name: str) -> bytes:
    return self.tree.read(name)

  def describe(self, name: str = "") -> str:
    return self.tree.describe(name or self.root or ".")


def find_archive(manual_dir: str | os.PathLike[str]) -> Archive:
  """Locates the archive tree in `manual_dir` (a folder, a .zip, or a folder with a .zip).

  Prefers the shallowest tree (so `Lung Segmentation/` over `data/Lung Segmentation/`);
  the other copies are listed in `ignored_roots` and never read.

  Raises:
    ArchiveError: nothing usable there; the message says where it looked and what it expected.
  """
  path = pathlib.Path(os.path.expanduser(os.fspath(manual_dir)))
  if not os.fspath(manual_dir):
    raise ArchiveError(f"No manual_dir given; expected {EXPECTED}.")
  if not path.exists():
    raise ArchiveError(f"manual_dir {path} does not exist; expected {EXPECTED}.")
  if path.is_file():
    trees = [_open_zip(path)]
  else:
    trees = [_open_dir(path)]
    if not _roots(trees[0]):
      trees = [_open_zip(z) for z in sorted(path.glob("*.zip"))]
  found = [(tree, _roots(tree)) for tree in trees]
  found = [(tree, roots) for tree, roots in found if roots]
  if not found:
    zips = sorted(p.name for p in path.glob("*.zip")) if path.is_dir() else [path.name]
    raise ArchiveError(
      f"No chest X-rays found in {path}: looked for CXR_png/ holding .png/.jpg images in it "
      f"and up to {_MAX_DEPTH} folders below it"
      + (f", and inside {', '.join(zips)}" if zips else " (and in any .zip there: none)")
      + f". Expected {EXPECTED}. Point manual_dir (--manual_dir, config.data.manual_dir or "
      "$CXR_MANUAL_DIR) at the archive."
    )
  if len(found) > 1:
    raise ArchiveError(
      f"{path} holds several archives ({', '.join(t.location for t, _ in found)}); "
      "point manual_dir at one of them."
    )
  tree, roots = found[0]

  def preference(prefix: str) -> tuple[int, bool, str]:
    return (prefix.count("/"), not prefix.endswith("Lung Segmentation/"), prefix)

  ordered = sorted(roots, key=preference)
  return Archive(tree=tree, root=ordered[0], ignored_roots=ordered[1:])


# ----- pairing images, masks and readings -----


def _stem_and_suffix(name: str) -> tuple[str, str]:
  base = name.rsplit("/", 1)[-1]
  stem, dot, suffix = base.rpartition(".")
  return (stem, "." + suffix.lower()) if dot else (base, "")


def _children(tree: _Tree, folder: str) -> list[str]:
  """Files directly inside `folder` (a prefix ending in '/'), by stem, .png first."""

  def order(name: str) -> tuple[str, bool, str]:
    stem, suffix = _stem_and_suffix(name)
    return stem, suffix != ".png", name

  return sorted(
    (n for n in tree.names if n.startswith(folder) and "/" not in n[len(folder) :]), key=order
  )


def scan_archive(archive: Archive) -> tuple[list[Record], list[Skip]]:
  """Pairs each image of CXR_png/ with its mask and reading; reports files it cannot use.

  Returns:
    records: one per usable image id, sorted by id.
    skipped: unrecognised image names, duplicate ids, duplicate masks, masks without an image
      and images that exist only in test/.
  """
  root, tree = archive.root, archive.tree
  skipped: list[Skip] = []
  images: dict[str, str] = {}
  for name in _children(tree, root + "CXR_png/"):
    stem, suffix = _stem_and_suffix(name)
    if suffix not in IMAGE_SUFFIXES:
      skipped.append(Skip(name, "not an image", f"expected {'/'.join(IMAGE_SUFFIXES)}"))
    elif not _ID_PATTERN.fullmatch(stem):
      skipped.append(
        Skip(name, "unrecognised name", "expected MCUCXR_<n>_<0|1> or CHNCXR_<n>_<0|1>")
      )
    elif stem in images:
      skipped.append(Skip(name, "duplicate id", f"{stem} already read from {images[stem]}"))
    else:
      images[stem] = name

  masks: dict[str, str] = {}
  for name in _children(tree, root + "masks/"):
    stem, suffix = _stem_and_suffix(name)
    image_id = stem.removesuffix("_mask")
    if suffix not in IMAGE_SUFFIXES:
      skipped.append(Skip(name, "not an image", f"expected {'/'.join(IMAGE_SUFFIXES)}"))
    elif image_id not in images:
      skipped.append(Skip(name, "mask without an image", f"no CXR_png/{image_id}.*"))
    elif image_id in masks:
      skipped.append(Skip(name, "duplicate mask", f"for {image_id}, using {masks[image_id]}"))
    else:
      masks[image_id] = name

  for name in _children(tree, root + "test/"):
    stem, suffix = _stem_and_suffix(name)
    if suffix in IMAGE_SUFFIXES and stem not in images:
      skipped.append(Skip(name, "image only in test/", "images are read from CXR_png/"))

  readings: dict[str, str] = {}
  for folder in (root + "ClinicalReadings/", _parent(root) + "ClinicalReadings/"):
    for name in _children(tree, folder):
      stem, suffix = _stem_and_suffix(name)
      if suffix == ".txt":
        readings.setdefault(stem, name)

  records = []
  for image_id, name in sorted(images.items()):
    prefix, _, label = image_id.split("_")
    records.append(
      Record(
        id=image_id,
        source=SOURCE_OF_PREFIX[prefix],
        label=int(label),
        image=name,
        mask=masks.get(image_id),
        readings=readings.get(image_id),
      )
    )
  return records, skipped


def _parent(root: str) -> str:
  parts = root.rstrip("/").split("/")[:-1]
  return "/".join(parts) + "/" if parts else ""


# ----- clinical readings -----

_MONTGOMERY_SEX = re.compile(r"Patient'?s\s+Sex\s*:\s*([MF])", re.IGNORECASE | re.ASCII)
_MONTGOMERY_AGE = re.compile(r"Patient'?s\s+Age\s*:\s*0*(\d+)\s*Y?", re.IGNORECASE | re.ASCII)
_SHENZHEN_SEX_AGE = re.compile(
  r"^\s*(male|female|m|f)\b[\s,:]*(\d+)?\s*(?:yrs?|years?|y)?", re.IGNORECASE | re.ASCII
)


def parse_readings(text: str) -> tuple[str, int, str]:
  """Parses a ClinicalReadings file (either format) into (sex 'M'|'F'|'', age or -1, finding).

  Montgomery: "Patient's Sex: F" / "Patient's Age: 027Y" / finding lines.
  Shenzhen:   "male 45yrs" / finding lines.
  """
  lines = [line.strip() for line in text.replace("\r", "\n").split("\n")]
  lines = [line for line in lines if line]
  sex, age, finding_lines = "", -1, []
  for line in lines:
    if m := _MONTGOMERY_SEX.search(line):
      sex = m.group(1).upper()
    elif m := _MONTGOMERY_AGE.search(line):
      age = int(m.group(1))
    elif not sex and not finding_lines and (m := _SHENZHEN_SEX_AGE.match(line)):
      sex = m.group(1)[0].upper()
      age = int(m.group(2)) if m.group(2) else -1
    else:
      finding_lines.append(line)
  return sex, age, " ".join(finding_lines)


def decode_text(data: bytes) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    return data.decode("latin-1")
